"""`python -m growlm.grow_main`: kept as the documented command; the code is growlm/cli/grow.py."""

from growlm.cli.grow import run

if __name__ == "__main__":
  run()
