"""`python -m growlm.worker`: what a remote backend runs on every host; the code is
growlm/cli/worker.py."""

from growlm.cli.worker import run

if __name__ == "__main__":
  run()
