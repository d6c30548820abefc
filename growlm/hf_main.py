"""`python -m growlm.hf_main`: kept as the documented command; the code is growlm/cli/hf.py."""

from growlm.cli.hf import run

if __name__ == "__main__":
  run()
