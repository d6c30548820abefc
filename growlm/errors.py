"""One error type for bad user input (configs, flags, data, checkpoints).

Entry points catch `GrowlmError` and print its message as a single line with a
non-zero exit (EXIT_USER_ERROR), so every message must name what is wrong and what is
accepted.
"""


# Exit codes of the command line (documented in README.md, "The run directory").
EXIT_USER_ERROR = 2    # bad input: one `growlm: error:` line, nothing written
EXIT_DIVERGED = 3      # training diverged; the last good checkpoint is kept
EXIT_PEER_LOST = 4     # multi-process: a peer did not join, failed or was lost; relaunch them all
EXIT_PREEMPTED = 75    # stopped by SIGTERM, SIGINT or SIGHUP after saving, or during start-up
                       # before anything was written (EX_TEMPFAIL): relaunch


class GrowlmError(ValueError):
  """Bad input from the user: the message is one line, naming field and accepted values."""


def first_line(error: BaseException) -> str:
  """The first non-blank line of an exception's text (compilers' and native libraries' messages
  span many lines), or its type's name when it has none: for one-line GrowlmErrors."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def strict_fields(what: str, given, known) -> dict:
  """`given` as a dict, refusing keys outside `known` (no silent drops of misspelt fields)."""
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise GrowlmError(f"{what}: unknown field(s) {unknown}; accepted: {sorted(known)}")
  return dict(given)


class Preempted(Exception):
  """Training stopped on a signal (SIGTERM, SIGINT, SIGHUP) after its checkpoint was saved and
  finalised; relaunching the same command resumes from it. Entry points exit with
  EXIT_PREEMPTED."""

  def __init__(self, step: int, signal_name: str, workdir: str):
    super().__init__(f"{signal_name} at step {step}: checkpoint {step} saved in {workdir}; "
                     "relaunch the same command to resume")
    self.step = step
    self.signal_name = signal_name
