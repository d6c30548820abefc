"""`python -m growlm.prepare`: tokenize a source once into token shards; the code is
growlm/cli/prepare.py."""

from growlm.cli.prepare import run

if __name__ == "__main__":
  run()
