"""The absl side of config files: `--config=PATH[:ARG]` and `--config.FIELD=VALUE`.

Use `app.run(main, flags_parser=config_flags_parser)` and read the config with `config()`;
a command without a config uses `plain_flags_parser`, and `flags_only(parser)` refuses positional
arguments for a command that takes none.
The parser takes the --config arguments out of argv before absl sees them, so that a bad
config file, an unknown field or a bad value is one `growlm: error:` line with exit status 2
(not an absl traceback), and so that free-form sections (data.eval) accept new names.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Callable, NoReturn

from absl import flags
import ml_collections

from growlm.config import files
from growlm import errors
from growlm.errors import GrowlmError
from growlm.train import peers

_SPEC = re.compile(r"^--?config(?:=(.*))?$", re.S)
_FIELD = re.compile(r"^--?(no)?config\.([^=]+)(?:=(.*))?$", re.S)
_HELP = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull", "--helpxml")
_HELP_TEXT = ("Config file PATH[:ARG] (configs/*.py); set any field with --config.FIELD=VALUE, "
              "e.g. --config.train.num_steps=200")

_LOADED: dict[str, ml_collections.ConfigDict | None] = {"config": None}


def config() -> ml_collections.ConfigDict | None:
  """The config that --config (and --config.FIELD=VALUE) gave; None when --config was not given."""
  return _LOADED["config"]


def setup_logging(level: int = logging.INFO) -> None:
  """Log lines with time and module; absl's own INFO lines (orbax logs every file it writes)
  are kept out."""
  logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  # jax's "Unable to initialize backend 'tpu'" INFO line, on every machine without a TPU
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def guarded(fn: Callable[[], Any]) -> Any:
  """Runs `fn` and turns every expected way for a command to end early into one line and an exit
  code (growlm.errors): bad input (2), a file system error such as a full disk (2), divergence
  (3), a peer of a multi-process run lost (4), a stop signal after the checkpoint is saved (75).
  In a multi-process run, an error the others may not share is passed on to them
  (growlm.train.peers); divergence and a stop signal come to all at the same step."""
  try:
    return fn()
  except GrowlmError as e:
    fail(e)
  except FloatingPointError as e:   # training diverged; the last good checkpoint is kept
    print(f"growlm: diverged: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_DIVERGED)
  except errors.Preempted as e:     # a signal: the step's checkpoint is saved and final
    print(f"growlm: stopped: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_PREEMPTED)
  except OSError as e:              # disk full, permission denied, a vanished path
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    fail(GrowlmError(f"{type(e).__name__}: {e.strerror or e}{where}; nothing was changed that "
                     "a relaunch cannot resume from; fix the cause and relaunch"))
  except Exception as e:  # pylint: disable=broad-except
    if peers.lost(e):
      peers.leave(peers.lost_line(e), errors.EXIT_PEER_LOST)
    raise


def fail(e: GrowlmError) -> NoReturn:
  """Prints `growlm: error: MESSAGE` as one line on stderr and exits with status 2 (telling the
  other processes of a multi-process run, growlm.train.peers)."""
  peers.leave("growlm: error: " + " ".join(str(e).split("\n")), errors.EXIT_USER_ERROR)


def _find_spec(argv: list[str]) -> str | None:
  """The last --config=SPEC (or --config SPEC) before '--'."""
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    m = _SPEC.match(arg)
    if m:
      if m.group(1) is None and i + 1 >= len(argv):
        raise GrowlmError("--config needs a value; accepted: --config=configs/FILE.py[:ARG]")
      spec = argv[i + 1] if m.group(1) is None else m.group(1)
  return spec


_MISSING = object()


def _value(cfg: ml_collections.ConfigDict | None, dotted: str):
  """The value at `dotted` in `cfg`; _MISSING when there is no config or no such field."""
  node = cfg
  for p in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      return _MISSING
    node = node[p]
  return node


def _split(argv: list[str], cfg: ml_collections.ConfigDict | None
           ) -> tuple[dict[str, str | bool], list[str]]:
  """(--config.FIELD overrides in order, the argv left for absl); --config itself is dropped.

  As absl does for flags: a bare `--config.FIELD` of a bool field is True (`--noconfig.FIELD`
  False), and of another field takes the next argument as its value.
  """
  overrides: dict[str, str | bool] = {}
  rest, i = [argv[0]], 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      rest += argv[i:]
      break
    m, f = _SPEC.match(arg), _FIELD.match(arg)
    if m:
      i += 1 if m.group(1) is not None else 2
      continue
    if not f:
      rest.append(arg)
      i += 1
      continue
    no, dotted, value = f.groups()
    if no and value is not None:
      raise GrowlmError(f"{arg}: a value after --noconfig.{dotted}; accepted: "
                        f"--config.{dotted}=VALUE or --noconfig.{dotted}")
    existing = _value(cfg, dotted)
    if value is None:
      # An unknown field consumes nothing: apply_overrides reports it with a close match.
      if no or existing is _MISSING or isinstance(existing, bool):
        value = not no
      elif i + 1 < len(argv):
        value, i = argv[i + 1], i + 1
      else:
        raise GrowlmError(f"--config.{dotted} needs a value; accepted: --config.{dotted}=VALUE")
    if dotted in overrides and isinstance(existing, (tuple, list)):
      # config_flags joined repeated tuple flags into one tuple; say so instead of dropping one.
      raise GrowlmError(f"--config.{dotted} given twice; accepted: once, as "
                        f"--config.{dotted}=(a,b,...)")
    overrides.pop(dotted, None)  # the last one wins, as for absl flags
    overrides[dotted] = value
    i += 1
  return overrides, rest


def _parse_absl(rest: list[str]) -> list[str]:
  """flags.FLAGS(rest), an absl flag error as one `growlm: error:` line (absl: 'FATAL ...')."""
  try:
    return flags.FLAGS(rest)
  except flags.IllegalFlagValueError as e:   # absl names the flag and the value
    fail(GrowlmError(f"{str(e).strip()}; accepted: a value of that flag's type (--helpfull)"))
  except flags.Error as e:
    fail(GrowlmError(f"{str(e).strip()}; accepted: the flags that --helpfull lists"))


def config_flags_parser(argv: list[str]) -> list[str]:
  """absl `flags_parser`: --config and --config.FIELD=VALUE here, every other flag by absl.

  Returns absl's remaining argv (program name and positional arguments) for `main`.
  """
  if "config" not in flags.FLAGS:
    # Listed by --help only: the value never reaches absl (the config comes from config()).
    flags.DEFINE_string("config", None, _HELP_TEXT)
  argv = _read_flagfiles(argv)
  try:
    if any(a.split("=", 1)[0] in _HELP for a in argv[1:]):
      _parse_absl(_split(argv, None)[1])  # prints help and exits, even if the config is broken
    spec = _find_spec(argv)
    cfg = files.load(spec) if spec is not None else None
    overrides, rest = _split(argv, cfg)
    if overrides and cfg is None:
      raise GrowlmError(f"--config.{next(iter(overrides))} given without --config=FILE; "
                        "accepted: --config=configs/FILE.py[:ARG] --config.FIELD=VALUE")
    positional = _parse_absl(rest)
    if cfg is not None:
      files.apply_overrides(cfg, overrides)
  except GrowlmError as e:
    fail(e)
  _LOADED["config"] = cfg
  return positional


def _read_flagfiles(argv: list[str]) -> list[str]:
  """argv with each --flagfile=PATH replaced by its flags; one error line if one cannot be read."""
  try:
    return [argv[0]] + flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  except flags.Error as e:
    fail(GrowlmError(str(e).strip().removeprefix("ERROR::").strip()))


def plain_flags_parser(argv: list[str]) -> list[str]:
  """absl `flags_parser` for a command with no --config: an unknown flag or a bad value is one
  `growlm: error:` line and exit status 2, as under config_flags_parser (absl: 'FATAL ...')."""
  return _parse_absl(_read_flagfiles(argv))


def flags_only(parser: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
  """`parser`, refusing positional arguments: a command that takes flags only would otherwise
  ignore a word that was meant as a flag's value (`--out DIR` typed as `--out= DIR`)."""
  def parse(argv: list[str]) -> list[str]:
    rest = parser(argv)
    if len(rest) > 1:
      fail(GrowlmError(f"unexpected arguments {rest[1:]}; accepted: flags only, as --name=value "
                       f"(--helpfull lists them)"))
    return rest
  return parse
