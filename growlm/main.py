"""`python -m growlm.main`: kept as the documented command; the code is growlm/cli/train.py."""

from growlm.train import signals

if __name__ == "__main__":
  with signals.start_up():   # first: a stop signal while JAX imports or compiles is one line too
    from growlm.cli.train import run  # pylint: disable=g-import-not-at-top
    run()
