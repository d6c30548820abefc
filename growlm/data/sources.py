"""Corpus sources: a source spec and a split -> documents, and a Corpus with its manifest.

Source specs (`load_corpus`):
  "stdlib"                   the Python standard library's own .py files: the
                             embedded default corpus, present on every machine.
  "file:PATTERN[,PATTERN]"   local text files or globs; each file a document.
  "tfds:NAME[:SPLIT]"        a tensorflow-datasets dataset prepared in
                             array_record format under `data_dir` ("text" feature),
                             read by tfds_text.py (prepare.py writes one).

Train and eval never overlap: stdlib splits whole documents by a hash of their
path, files are split by their tail (the last `eval_fraction` of characters),
tfds datasets use their own splits. "all" is everything (eval-only datasets).
"""

from __future__ import annotations

import glob
import os
import platform
import sysconfig
from pathlib import Path

from growlm.data import documents
from growlm.data import tfds_text
from growlm.errors import GrowlmError

SOURCE_FORMS = "'stdlib', 'file:PATTERN[,PATTERN...]' or 'tfds:NAME[:SPLIT]'"
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def _hash_fraction(doc_id: str) -> int:
  """A document's place in [0, 10000), stable across machines and Python runs."""
  return int(documents._sha(doc_id.encode("utf-8"))[:8], 16) % 10000


def stdlib_files() -> list[tuple[str, Path]]:
  """(relative posix path, path) of the stdlib's .py files, ordered by sha256 of the path.

  Hash order, not name order, so that a byte cap samples modules across the
  whole library instead of only its first letters.
  """
  root = Path(sysconfig.get_paths()["stdlib"])
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
    for fname in filenames:
      if fname.endswith(".py"):
        path = Path(dirpath) / fname
        found.append((path.relative_to(root).as_posix(), path))
  found.sort(key=lambda item: (documents._sha(item[0].encode("utf-8")), item[0]))
  return found


def _stdlib_documents(split: str, eval_fraction: float,
                      max_bytes: int) -> list[tuple[str, str]]:
  """(relative path, text) of the stdlib files in `split`, under the byte cap."""
  # The cap applies before the split, so train + eval == all under any cap. A
  # file that does not fit is skipped and later (smaller) ones may still fit.
  docs, total = [], 0
  threshold = eval_fraction * 10000
  for rel, path in stdlib_files():
    data = path.read_bytes()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      continue
    if max_bytes and total + len(data) > max_bytes:
      continue
    total += len(data)
    is_eval = _hash_fraction(rel) < threshold
    if split == "all" or (split == "eval") == is_eval:
      docs.append((rel, text))
  return docs


def _tail_cut(text: str, eval_fraction: float) -> int:
  """Index where a file's eval tail starts: the last fraction, moved to the next line start."""
  if eval_fraction <= 0:
    return len(text)
  cut = int(len(text) * (1.0 - eval_fraction))
  newline = text.find("\n", cut)
  return cut if newline < 0 else newline + 1


def resolve_file_patterns(patterns: str) -> list[str]:
  """Expands 'a.txt,dir/*.txt' into sorted unique file paths; a miss is a GrowlmError."""
  paths = set()
  for pattern in patterns.split(","):
    pattern = pattern.strip()
    if not pattern:
      raise GrowlmError(f"empty pattern in file source 'file:{patterns}' (accepted: "
                        "'file:PATTERN[,PATTERN...]')")
    found = glob.glob(os.path.expanduser(pattern))
    matches = [p for p in found if os.path.isfile(p)]
    if not matches and found:
      raise GrowlmError(f"file source pattern {pattern!r} matches only directories; accepted: "
                        f"text files or globs of them, e.g. 'file:{found[0]}/*.txt'")
    if not matches:
      raise GrowlmError(f"file source pattern {pattern!r} matches no file")
    paths.update(matches)
  return sorted(paths)


def _file_documents(patterns: str, split: str, eval_fraction: float) -> list[tuple[str, str]]:
  """(path[#split], text) of each matched file: whole for "all", else its head or tail."""
  docs = []
  for path in resolve_file_patterns(patterns):
    try:
      text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise GrowlmError(f"file {path!r} is not UTF-8 text (byte {e.start})") from e
    cut = _tail_cut(text, eval_fraction)
    if split == "all":
      docs.append((path, text))
    elif split == "train":
      docs.append((f"{path}#train", text[:cut]))
    else:
      docs.append((f"{path}#eval", text[cut:]))
  return docs


def load_documents(spec: str, split: str, *, eval_fraction: float = 0.1, max_bytes: int = 0,
                   data_dir: str | None = None) -> list[tuple[str, str]]:
  """(document id, text) pairs of one split of a source; may be empty. See `load_corpus`."""
  if split not in documents.SPLITS:
    raise GrowlmError(f"split {split!r} not accepted (accepted: {', '.join(documents.SPLITS)})")
  if not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction < 1.0:
    raise GrowlmError(f"eval_fraction={eval_fraction!r} not accepted (accepted: 0 <= x < 1)")
  if not isinstance(max_bytes, int) or max_bytes < 0:
    raise GrowlmError(f"max_bytes={max_bytes!r} not accepted (accepted: an int >= 0, 0 = no cap)")
  if not isinstance(spec, str):
    raise GrowlmError(f"source spec {spec!r} not understood (accepted: {SOURCE_FORMS})")
  if spec == "stdlib":
    docs = _stdlib_documents(split, eval_fraction, max_bytes)
  elif spec.startswith("file:"):
    docs = _file_documents(spec[len("file:"):], split, eval_fraction)
    if max_bytes:
      docs = documents._cap_documents(docs, max_bytes)
  elif spec.startswith("tfds:"):
    docs = tfds_text.tfds_documents(spec[len("tfds:"):], split, data_dir, max_bytes)
  else:
    raise GrowlmError(f"source spec {spec!r} not understood (accepted: {SOURCE_FORMS})")
  # An empty document would only add a stray end-of-text token.
  return [(doc_id, text) for doc_id, text in docs if text]


def load_corpus(spec: str, split: str, *, eval_fraction: float = 0.1, max_bytes: int = 0,
                data_dir: str | None = None) -> documents.Corpus:
  """Loads one split ("train", "eval" or "all") of a source spec as documents.

  Args:
    spec: "stdlib", "file:PATTERN[,PATTERN...]" or "tfds:NAME[:SPLIT]".
    split: "train", "eval" or "all"; train and eval never share text.
    eval_fraction: share held out for eval (stdlib: of documents by path hash;
      files: of each file's characters, from its tail). Unused by tfds.
    max_bytes: cap on UTF-8 bytes, 0 = none. stdlib: whole files in hash
      order, skipping those that no longer fit, applied before the split (so
      train + eval == all); file/tfds: applied to the chosen split, the
      document crossing the cap is cut.
    data_dir: tensorflow-datasets data dir for "tfds:" specs.

  Returns:
    A Corpus whose manifest["sha256"] hashes the ordered (id, content sha) list.
  """
  docs = load_documents(spec, split, eval_fraction=eval_fraction, max_bytes=max_bytes,
                        data_dir=data_dir)
  if not docs:
    raise GrowlmError(f"source {spec!r} split {split!r} is empty (eval_fraction={eval_fraction}, "
                      f"max_bytes={max_bytes})")
  sha, n_bytes = documents.documents_sha256(docs)
  manifest = {
      "spec": spec, "split": split, "n_documents": len(docs), "n_bytes": n_bytes,
      "sha256": sha, "python_version": platform.python_version(),
      "eval_fraction": eval_fraction, "max_bytes": max_bytes,
  }
  return documents.Corpus(name=spec, split=split, documents=[text for _, text in docs],
                          n_bytes=n_bytes, manifest=manifest)
