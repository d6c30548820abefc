"""`python -m growlm.sample`: text from a run or an HF directory; the code is
growlm/cli/sample.py."""

from growlm.cli.sample import run

if __name__ == "__main__":
  run()
