"""Config files (`PATH[:ARG]`) and field overrides (`FIELD=VALUE`), with one-line errors.

A config file is a Python file defining `get_config(arg)`; `load("configs/default.py:size=nano")`
imports it and calls it. `apply_overrides` sets fields from command-line strings, parsed by
the type of the value they replace; `set_field` sets already-typed values (the sweep layer).
Every user mistake is a `GrowlmError` whose message is one line. No JAX here: the command line
loads configs before it decides how to start JAX.
"""

from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any, Mapping

import ml_collections

from growlm.errors import GrowlmError

# Sections whose keys are names the user picks (data.eval: name -> "SOURCE[@SPLIT]"), so an
# override may add a key there; everywhere else a new key is a misspelling.
FREE_FORM = ("data.eval",)

_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")


def _first_line(e: BaseException, limit: int = 400) -> str:
  """An error raised by a user's config code, as one line: its lines joined (ml_collections'
  type errors say what is wrong at the end), cut at `limit` characters."""
  text = " ".join(str(e).split())
  if len(text) > limit:
    text = text[:limit - 4] + " ..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class ArgumentError(GrowlmError):
  """A bad config argument (the ARG of `PATH:ARG`, growlm.config.defaults.parse_arg): `load`
  names the file it was given to, so the line names what the user typed, not a field it sets."""

  def __init__(self, part: str, accepted: str, problem: str = ""):
    self.part, self.accepted, self.problem = part, accepted, problem
    super().__init__(self.line())

  def line(self, path: str | None = None) -> str:
    of = f" of {path}" if path else ""
    return f"config argument {self.part!r}{of}{self.problem}; accepted: {self.accepted}"


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/default.py:size=nano,runlocal' -> ('configs/default.py', 'size=nano,runlocal')."""
  path, _, arg = spec.partition(":")
  return path, (arg or None)


def load_module(path: str):
  """Imports the config file at `path`; any way that fails is one GrowlmError line."""
  if not path or not os.path.exists(path):
    raise GrowlmError(f"--config={path}: no such file; accepted: a configs/*.py path")
  if os.path.isdir(path):
    raise GrowlmError(f"--config={path} is a directory; accepted: a configs/*.py file")
  name = f"growlm_config_{abs(hash(os.path.abspath(path)))}"
  # SourceFileLoader takes any file name (spec_from_file_location wants a .py suffix).
  loader = importlib.machinery.SourceFileLoader(name, path)
  mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
  sys.modules[name] = mod  # dataclasses and pickle look classes up by module name
  try:
    # Compiled here, not by loader.exec_module: that would write __pycache__/ next to the file.
    exec(compile(loader.get_data(path), path, "exec", dont_inherit=True), mod.__dict__)
  except GrowlmError:
    del sys.modules[name]
    raise
  except SyntaxError as e:
    del sys.modules[name]
    raise GrowlmError(f"--config={path}: syntax error at {e.filename or path}:{e.lineno}: "
                      f"{e.msg}") from None
  except Exception as e:  # pylint: disable=broad-except
    del sys.modules[name]
    raise GrowlmError(f"--config={path}: importing it raised {_first_line(e)}") from None
  if not callable(getattr(mod, "get_config", None)):
    raise GrowlmError(f"--config={path} defines no get_config(arg); accepted: a config file "
                      "with def get_config(arg=None)")
  return mod


def load(spec: str) -> ml_collections.ConfigDict:
  """The (unlocked) ConfigDict that `PATH[:ARG]` describes: get_config(ARG) of file PATH."""
  path, arg = split_spec(spec)
  mod = load_module(path)
  try:
    # As ml_collections did: a file whose get_config takes no argument works without ':ARG'.
    cfg = mod.get_config() if arg is None else mod.get_config(arg)
  except ArgumentError as e:
    raise GrowlmError(e.line(path)) from None
  except GrowlmError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise GrowlmError(f"--config={spec}: get_config({arg!r}) in {path} raised "
                      f"{_first_line(e)}") from None
  if isinstance(cfg, dict):
    cfg = ml_collections.ConfigDict(cfg)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise GrowlmError(f"--config={spec}: get_config returned {type(cfg).__name__}; accepted: "
                      "an ml_collections.ConfigDict")
  return cfg


def _locate(cfg: ml_collections.ConfigDict, dotted: str, what: str):
  """(section, key, exists) of `dotted`; a missing field outside FREE_FORM is a GrowlmError."""
  parts = dotted.split(".")
  if not all(parts):
    raise GrowlmError(f"{what}: config field {dotted!r} is not a dotted name; accepted: "
                      "SECTION.FIELD like 'train.num_steps'")
  node = cfg
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      raise GrowlmError(f"{what}: config field {'.'.join(parts[:i])!r} is a value, not a "
                        f"section; accepted: set it as {'.'.join(parts[:i])}=VALUE")
    if p not in node:
      section = ".".join(parts[:i])
      if i == len(parts) - 1 and section in FREE_FORM:
        return node, p, False
      keys = sorted(node.keys())
      close = difflib.get_close_matches(p, keys, n=1)
      if close:
        fix = ".".join(parts[:i] + close + parts[i + 1:])
        raise GrowlmError(f"{what}: config field {dotted!r} does not exist; did you mean {fix!r}?")
      where = f"section {section!r}" if section else "the config"
      raise GrowlmError(f"{what}: config field {dotted!r} does not exist; accepted fields of "
                        f"{where}: {', '.join(keys)}")
    if i < len(parts) - 1:
      node = node[p]
  return node, parts[-1], True


def _kind(existing: Any) -> str:
  if isinstance(existing, bool):
    return "a bool"
  if isinstance(existing, int):
    return "an integer"
  if isinstance(existing, float):
    return "a number"
  if isinstance(existing, ml_collections.ConfigDict):
    return "a dict (a whole section)"
  return f"a {type(existing).__name__}"


def set_field(cfg: ml_collections.ConfigDict, dotted: str, value: Any, *, what: str) -> None:
  """cfg.a.b.c = value (typed); `what` (e.g. '--config') starts the error line."""
  node, key, exists = _locate(cfg, dotted, what)
  if not exists:
    if not isinstance(value, str):
      raise GrowlmError(f"{what}: new entry {dotted!r} takes a string (SOURCE[@SPLIT]); "
                        f"got {value!r}")
    with node.unlocked():  # adding a key to a locked section needs this; setting does not
      node[key] = value
    return
  existing = node[key]
  if isinstance(existing, ml_collections.ConfigDict) and not isinstance(
      value, (dict, ml_collections.ConfigDict)):
    raise GrowlmError(f"{what}: config field {dotted!r} is a section; accepted: a dict for the "
                      f"whole section, or one of its fields: {', '.join(sorted(existing.keys()))}")
  try:
    node[key] = value
  except TypeError:
    raise GrowlmError(f"{what}: config field {dotted!r} takes {_kind(existing)}; "
                      f"got {value!r}") from None


_NOT_LITERAL = object()


def _literal(text: str, default: Any = _NOT_LITERAL) -> Any:
  """ast.literal_eval(text), or `default` (the text itself unless given) when it is no literal."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text if default is _NOT_LITERAL else default


def _split_top(text: str) -> list[str]:
  """Splits at commas outside brackets and quotes: 'a,(b,c)' -> ['a', '(b,c)']."""
  items, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(text):
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return items + [text[start:]]


def _parse_seq(text: str) -> tuple:
  """'(a,b,)', '[a,b]', 'a,b', '(a,)', '()' and Python literals -> a tuple; bare words are strings."""
  s = text.strip()
  value = _literal(s, None)
  if isinstance(value, (tuple, list)):
    return tuple(value)
  if value is not None:  # one literal, e.g. '3' -> (3,)
    return (value,)
  if s[:1] + s[-1:] in ("()", "[]"):
    s = s[1:-1]
  items = _split_top(s)
  if not items[-1].strip():  # '(a,)' and '()' end with an empty item
    items.pop()
  out = []
  for item in items:
    word = item.strip()
    v = _literal(word, None)
    if v is None and word != "None":
      # Not a literal: a nested sequence of bare words, e.g. ((batch,(data,fsdp)),), or a word.
      v = _parse_seq(word) if word[:1] + word[-1:] in ("()", "[]") else word
    out.append(v)
  return tuple(out)


def parse_value(existing: Any, text: str, dotted: str, *, what: str = "--config") -> Any:
  """Command-line `text` as a value of the type of `existing` (the field's current value)."""
  s = text.strip()
  if isinstance(existing, bool):
    if s.lower() in _TRUE + _FALSE:
      return s.lower() in _TRUE
    raise GrowlmError(f"{what}: config field {dotted!r} takes a bool; got {text!r}; accepted: "
                      "true, false, 1, 0, yes, no")
  if isinstance(existing, int):
    for base in (10, 0):  # 0 reads 0x.. / 0o.. / 0b.. as well
      try:
        return int(s, base)
      except ValueError:
        pass
    raise GrowlmError(f"{what}: config field {dotted!r} takes an integer; got {text!r}")
  if isinstance(existing, float):
    try:
      return float(s)
    except ValueError:
      raise GrowlmError(f"{what}: config field {dotted!r} takes a number; got {text!r}") from None
  if isinstance(existing, str):
    return text
  if isinstance(existing, (tuple, list)):
    return type(existing)(_parse_seq(text))
  if isinstance(existing, (dict, ml_collections.ConfigDict)):
    value = _literal(s)
    if not isinstance(value, dict):
      raise GrowlmError(f"{what}: config field {dotted!r} is a section, got {text!r}; accepted: "
                        f"a dict like {{'key': 1}} for all of it, or {dotted}.FIELD=VALUE")
    return value
  return _literal(s)  # None or another type: a Python literal, else the string


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, str | bool], *,
                    what: str = "--config") -> None:
  """Sets each FIELD=TEXT in order; a bool value (a bare `--config.FIELD`) sets a bool field."""
  for dotted, text in overrides.items():
    node, key, exists = _locate(cfg, dotted, what)
    existing = node[key] if exists else ""
    if isinstance(text, bool):
      if not isinstance(existing, bool):
        raise GrowlmError(f"{what}: config field {dotted!r} needs a value; accepted: "
                          f"{what}.{dotted}=VALUE")
      value = text
    else:
      value = parse_value(existing, text, dotted, what=what)
    set_field(cfg, dotted, value, what=what)
