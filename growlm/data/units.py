"""Units: a source spec -> an ordered list of units of work, and each unit's documents per split.

A unit is the smallest piece of a source that is read on its own: one file (stdlib,
site-packages, file:, jsonl:, parquet:) or a range of records of a tfds split. The in-memory
loader (sources.py) reads every unit in order; `growlm.prepare` tokenizes groups of units in
parallel processes. Both see the same documents in the same order, so a prepared dataset holds
exactly the tokens `tokenize_corpus(load_corpus(spec, split), tokenizer)` gives.

How each source is split into train and eval (the two never share text):
  stdlib, site-packages   whole files, by a hash of their relative path
  file:                   each file's tail (its last eval_fraction of characters) is eval
  jsonl:, parquet:        whole rows, by a hash of (file, row number)
  tfds:                   the dataset's own splits (train; validation, eval or test)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from growlm import fs, transfer
from growlm.data import documents
from growlm.errors import GrowlmError

SOURCE_FORMS = ("'stdlib', 'site-packages', 'file:PATTERN[,PATTERN...]', 'jsonl:PATTERN[,...]', "
                "'parquet:PATTERN[,...]' or 'tfds:NAME[:SPLIT]'")
_TREE_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_TFDS_UNIT_RECORDS = 50_000


@dataclasses.dataclass(frozen=True)
class Unit:
  """One piece of a source: a file, or records [start, stop) of a tfds split (`path`)."""
  kind: str          # stdlib | site-packages | file | jsonl | parquet | tfds
  id: str            # stable across machines: a relative path, a file path, or split/start
  path: str          # the file, or the tfds split name
  size: int          # bytes on disk (records for tfds): for grouping and progress
  start: int = 0
  stop: int = 0


def hash_fraction(doc_id: str) -> int:
  """A document's place in [0, 10000), stable across machines and Python runs."""
  return int(documents._sha(doc_id.encode("utf-8"))[:8], 16) % 10000


def _tree_files(roots: list[Path], skip_dirs: frozenset) -> list[tuple[str, Path]]:
  """(relative posix path, path) of the .py files under `roots`, ordered by sha256 of the path.

  Hash order, not name order, so that a byte cap samples modules across the whole tree
  instead of only its first letters.
  """
  found = {}
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
      for fname in filenames:
        if fname.endswith(".py"):
          path = Path(dirpath) / fname
          found.setdefault(path.relative_to(root).as_posix(), path)
  return sorted(found.items(), key=lambda item: (documents._sha(item[0].encode("utf-8")),
                                                 item[0]))


def stdlib_files() -> list[tuple[str, Path]]:
  """(relative posix path, path) of the standard library's .py files (no tests), hash-ordered."""
  return _tree_files([Path(sysconfig.get_paths()["stdlib"])], _TREE_SKIP_DIRS)


def site_packages_files() -> list[tuple[str, Path]]:
  """(relative posix path, path) of every .py file of this environment's installed packages.

  The larger local corpus (hundreds of MB with the pinned set installed): which files it holds
  depends on what is installed, so its manifest hash is what says two machines read the same.
  """
  paths = sysconfig.get_paths()
  roots = sorted({Path(paths["purelib"]), Path(paths["platlib"])})
  return _tree_files([r for r in roots if r.is_dir()], frozenset({"__pycache__"}))


def resolve_file_patterns(patterns: str, prefix: str = "file") -> list[str]:
  """Expands 'a.txt,dir/*.txt' into sorted unique file paths; a miss is a GrowlmError."""
  paths = set()
  for pattern in patterns.split(","):
    pattern = pattern.strip()
    if not pattern:
      raise GrowlmError(f"empty pattern in source '{prefix}:{patterns}' (accepted: "
                        f"'{prefix}:PATTERN[,PATTERN...]')")
    if fs.is_url(pattern):   # gs://: objects are files; read through a local mirror
      found = matches = fs.glob(fs.check(pattern, f"{prefix} source pattern"))
    else:
      found = glob.glob(os.path.expanduser(pattern))
      matches = [p for p in found if os.path.isfile(p)]
    if not matches and found:
      raise GrowlmError(f"{prefix} source pattern {pattern!r} matches only directories; accepted: "
                        f"files or globs of them, e.g. '{prefix}:{found[0]}/*'")
    if not matches:
      raise GrowlmError(f"{prefix} source pattern {pattern!r} matches no file")
    paths.update(matches)
  return sorted(paths)


def list_units(spec: str, *, data_dir: str | None = None) -> list[Unit]:
  """The units of a source spec, in the order their documents are read."""
  if not isinstance(spec, str):
    raise GrowlmError(f"source spec {spec!r} not understood (accepted: {SOURCE_FORMS})")
  if spec in ("stdlib", "site-packages"):
    files = stdlib_files() if spec == "stdlib" else site_packages_files()
    if not files:
      raise GrowlmError(f"source {spec!r} has no .py files in this environment")
    return [Unit(spec, rel, str(path), path.stat().st_size) for rel, path in files]
  for kind in ("file", "jsonl", "parquet"):
    if spec.startswith(kind + ":"):
      paths = resolve_file_patterns(spec[len(kind) + 1:], kind)
      return [Unit(kind, path, path, fs.size(path)) for path in paths]
  if spec.startswith("tfds:"):
    return _tfds_units(spec[len("tfds:"):], data_dir)
  raise GrowlmError(f"source spec {spec!r} not understood (accepted: {SOURCE_FORMS})")


def _tfds_units(name: str, data_dir: str | None) -> list[Unit]:
  """Record ranges of the train split, then of the eval split, of a prepared tfds dataset."""
  from growlm.data import tfds_text  # pylint: disable=g-import-not-at-top  (tfds is slow)
  name, lengths = tfds_text.split_lengths(name, data_dir)
  eval_split = next((s for s in tfds_text.EVAL_SPLITS if s in lengths), None)
  units = []
  for split in ("train", eval_split):
    if split is None or split not in lengths:
      continue
    for start in range(0, lengths[split], _TFDS_UNIT_RECORDS):
      stop = min(start + _TFDS_UNIT_RECORDS, lengths[split])
      units.append(Unit("tfds", f"{name}/{split}/{start}", split, stop - start, start, stop))
  return units


def _tail_cut(text: str, eval_fraction: float) -> int:
  """Index where a file's eval tail starts: the last fraction, moved to the next line start."""
  if eval_fraction <= 0:
    return len(text)
  cut = int(len(text) * (1.0 - eval_fraction))
  newline = text.find("\n", cut)
  return cut if newline < 0 else newline + 1


def _in_split(doc_id: str, split: str, eval_fraction: float) -> bool:
  """Whether a hash-split document belongs to `split`."""
  return split == "all" or (split == "eval") == (hash_fraction(doc_id) < eval_fraction * 10000)


def _rows(unit: Unit, text_field: str) -> Iterator[tuple[int, str]]:
  """(row number, text) of each row of a JSONL or Parquet file."""
  if unit.kind == "jsonl":
    with open(transfer.mirror(unit.path), encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except ValueError as e:
          raise GrowlmError(f"{unit.path}:{line_no} is not a JSON line ({e})") from e
        yield line_no, _field(row, text_field, f"{unit.path}:{line_no}")
    return
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    table = pq.ParquetFile(transfer.mirror(unit.path))
    names = table.schema_arrow.names
  except Exception as e:  # pyarrow raises several types for a bad file
    raise GrowlmError(f"{unit.path} is not a readable Parquet file ({type(e).__name__})") from e
  if text_field not in names:
    raise GrowlmError(f"Parquet file {unit.path} has no column {text_field!r} (columns: "
                      f"{', '.join(names)}); accepted: files with that column, or another named by "
                      "data.text_field (growlm.main) or --text_field (growlm.prepare)")
  row = 0
  for batch in table.iter_batches(columns=[text_field], batch_size=4096):
    for value in batch.column(0).to_pylist():
      yield row, _field({text_field: value}, text_field, f"{unit.path} row {row}")
      row += 1


def _field(row, text_field: str, where: str) -> str:
  """The text field of one row; a missing or non-text field is a GrowlmError."""
  if not isinstance(row, dict) or text_field not in row:
    keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
    raise GrowlmError(f"{where} has no field {text_field!r} (it has: {keys}); accepted: rows "
                      "with that field, or another named by data.text_field (growlm.main) or "
                      "--text_field (growlm.prepare)")
  value = row[text_field]
  if value is None:
    return ""
  if not isinstance(value, str):
    raise GrowlmError(f"{where} field {text_field!r} is {type(value).__name__}, not text")
  return value


def unit_splits(unit: Unit, splits, *, eval_fraction: float, text_field: str = "text",
                data_dir: str | None = None) -> dict[str, list[tuple[str, str]]]:
  """{split: (document id, text) of the unit's documents in it} for each of `splits` ("train",
  "eval", "all"), reading the unit once (and not at all when none of them holds it)."""
  out: dict[str, list[tuple[str, str]]] = {split: [] for split in splits}
  if unit.kind in ("stdlib", "site-packages"):
    wanted = [split for split in splits if _in_split(unit.id, split, eval_fraction)]
    if wanted:
      try:   # an installed tree may hold a non-UTF-8 file: it is not part of the corpus
        text = Path(unit.path).read_bytes().decode("utf-8")
      except UnicodeDecodeError:
        return out
      for split in wanted:
        out[split].append((unit.id, text))
  elif unit.kind == "file":
    try:
      text = Path(transfer.mirror(unit.path)).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise GrowlmError(f"file {unit.path!r} is not UTF-8 text (byte {e.start})") from e
    cut = _tail_cut(text, eval_fraction)
    for split in splits:
      out[split].append((unit.path, text) if split == "all" else
                        (f"{unit.path}#{split}", text[:cut] if split == "train" else text[cut:]))
  elif unit.kind in ("jsonl", "parquet"):
    for row, text in _rows(unit, text_field):
      doc_id = f"{unit.path}:{row}"
      for split in splits:
        if _in_split(doc_id, split, eval_fraction):
          out[split].append((doc_id, text))
  elif unit.kind == "tfds":
    from growlm.data import tfds_text  # pylint: disable=g-import-not-at-top
    role = "train" if unit.path == "train" else "eval"
    wanted = [split for split in splits if split in ("all", role)]
    if wanted:
      docs = tfds_text.read_range(_tfds_name(unit), unit.path, unit.start, unit.stop, data_dir,
                                  text_field)
      for split in wanted:
        out[split] = list(docs)
  else:
    raise GrowlmError(f"unit kind {unit.kind!r} not understood")
  return out


def unit_documents(unit: Unit, split: str, *, eval_fraction: float, text_field: str = "text",
                   data_dir: str | None = None) -> list[tuple[str, str]]:
  """(document id, text) of the unit's documents in `split` ("train", "eval" or "all")."""
  return unit_splits(unit, (split,), eval_fraction=eval_fraction, text_field=text_field,
                     data_dir=data_dir)[split]


def in_split(unit: Unit, split: str, eval_fraction: float) -> bool:
  """Whether a hash-split unit (stdlib, site-packages) belongs to `split`."""
  return _in_split(unit.id, split, eval_fraction)


def _tfds_name(unit: Unit) -> str:
  """The tfds NAME of a tfds unit (its id is NAME/split/start)."""
  return unit.id.rsplit("/", 2)[0]


def check_text_field(unit: Unit, text_field: str, data_dir: str | None = None) -> None:
  """Reads the unit's first row, so a wrong text field fails before anything is written."""
  if unit.kind in ("jsonl", "parquet"):
    next(_rows(unit, text_field), None)
  elif unit.kind == "tfds" and unit.stop > unit.start:
    from growlm.data import tfds_text  # pylint: disable=g-import-not-at-top
    tfds_text.read_range(_tfds_name(unit), unit.path, unit.start, unit.start + 1, data_dir,
                         text_field)
