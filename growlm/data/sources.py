"""Corpus sources: a source spec and a split -> documents, and a Corpus with its manifest.

Source specs (`load_corpus`; units.py says how each is split into train and eval):
  "stdlib"                   the Python standard library's own .py files: the
                             embedded default corpus, present on every machine.
  "site-packages"            every .py file of the installed packages: a larger local
                             corpus (hundreds of MB); prepare it (growlm.prepare) first.
  "file:PATTERN[,PATTERN]"   local text files or globs; each file a document.
  "jsonl:PATTERN[,...]"      JSON-lines files, one document per line ("text" field).
  "parquet:PATTERN[,...]"    Parquet files, one document per row ("text" column).
  "tfds:NAME[:SPLIT]"        a tensorflow-datasets dataset prepared in
                             array_record format under `data_dir` ("text" feature),
                             read by tfds_text.py (tfds_prepare.py writes one).
  "prepared:DIR"             token shards written by `python -m growlm.prepare`: read by
                             growlm.data.stream, never loaded whole (not a `load_corpus` spec).

"all" is everything (eval-only datasets).
"""

from __future__ import annotations

import platform

from growlm.data import documents
from growlm.data import tfds_text
from growlm.data import units
from growlm.errors import GrowlmError

SOURCE_FORMS = units.SOURCE_FORMS + " or 'prepared:DIR'"
PREPARED = "prepared:"


def _stdlib_capped(split: str, eval_fraction: float, max_bytes: int) -> list[tuple[str, str]]:
  """(relative path, text) of the stdlib files in `split`, under the byte cap."""
  # The cap applies before the split, so train + eval == all under any cap. A
  # file that does not fit is skipped and later (smaller) ones may still fit.
  docs, total = [], 0
  for unit in units.list_units("stdlib"):
    found = units.unit_documents(unit, "all", eval_fraction=eval_fraction)
    if not found:
      continue
    n = len(found[0][1].encode("utf-8"))
    if total + n > max_bytes:
      continue
    total += n
    if units.in_split(unit, split, eval_fraction):
      docs.append(found[0])
  return docs


def load_documents(spec: str, split: str, *, eval_fraction: float = 0.1, max_bytes: int = 0,
                   data_dir: str | None = None, text_field: str = "text") -> list[tuple[str, str]]:
  """(document id, text) pairs of one split of a source; may be empty. See `load_corpus`."""
  if split not in documents.SPLITS:
    raise GrowlmError(f"split {split!r} not accepted (accepted: {', '.join(documents.SPLITS)})")
  if not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction < 1.0:
    raise GrowlmError(f"eval_fraction={eval_fraction!r} not accepted (accepted: 0 <= x < 1)")
  if not isinstance(max_bytes, int) or max_bytes < 0:
    raise GrowlmError(f"max_bytes={max_bytes!r} not accepted (accepted: an int >= 0, 0 = no cap)")
  if isinstance(spec, str) and spec.startswith(PREPARED):
    raise GrowlmError(f"source {spec!r} is prepared token shards, read by the trainer's "
                      "streaming loader; accepted here: " + units.SOURCE_FORMS)
  if isinstance(spec, str) and spec.startswith("tfds:"):
    docs = tfds_text.tfds_documents(spec[len("tfds:"):], split, data_dir, max_bytes, text_field)
  elif spec == "stdlib" and max_bytes:
    docs = _stdlib_capped(split, eval_fraction, max_bytes)
  else:
    docs = [doc for unit in units.list_units(spec, data_dir=data_dir)
            for doc in units.unit_documents(unit, split, eval_fraction=eval_fraction,
                                            text_field=text_field, data_dir=data_dir)]
    if max_bytes:
      docs = documents._cap_documents(docs, max_bytes)
  # An empty document would only add a stray end-of-text token.
  return [(doc_id, text) for doc_id, text in docs if text]


def load_corpus(spec: str, split: str, *, eval_fraction: float = 0.1, max_bytes: int = 0,
                data_dir: str | None = None, text_field: str = "text") -> documents.Corpus:
  """Loads one split ("train", "eval" or "all") of a source spec as documents.

  Args:
    spec: any spec in this module's docstring but "prepared:".
    split: "train", "eval" or "all"; train and eval never share text.
    eval_fraction: share held out for eval (stdlib, site-packages: of files by path hash;
      files: of each file's characters, from its tail; jsonl/parquet: of rows by hash).
      Unused by tfds.
    max_bytes: cap on UTF-8 bytes, 0 = none. stdlib: whole files in hash
      order, skipping those that no longer fit, applied before the split (so
      train + eval == all); other sources: applied to the chosen split, the
      document crossing the cap is cut.
    data_dir: tensorflow-datasets data dir for "tfds:" specs.
    text_field: the JSONL field, Parquet column or tfds feature holding the text.

  Returns:
    A Corpus whose manifest["sha256"] hashes the ordered (id, content sha) list.
  """
  docs = load_documents(spec, split, eval_fraction=eval_fraction, max_bytes=max_bytes,
                        data_dir=data_dir, text_field=text_field)
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
