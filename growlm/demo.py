"""`python -m growlm.demo`: kept as the documented command; the code is growlm/cli/demo.py."""

from growlm.cli.demo import run

if __name__ == "__main__":
  run()
