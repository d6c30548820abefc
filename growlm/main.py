"""`python -m growlm.main`: kept as the documented command; the code is growlm/cli/train.py."""

from growlm.cli.train import run

if __name__ == "__main__":
  run()
