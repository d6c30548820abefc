"""One error type for bad user input (configs, flags, data, checkpoints).

Entry points catch `GrowlmError` and print its message as a single line with a
non-zero exit, so every message must name what is wrong and what is accepted.
"""


class GrowlmError(ValueError):
  """Bad input from the user: the message is one line, naming field and accepted values."""


def strict_fields(what: str, given, known) -> dict:
  """`given` as a dict, refusing keys outside `known` (no silent drops of misspelt fields)."""
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise GrowlmError(f"{what}: unknown field(s) {unknown}; accepted: {sorted(known)}")
  return dict(given)
