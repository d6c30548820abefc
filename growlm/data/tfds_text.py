"""tensorflow-datasets text: read the documents of a "tfds:" source.

Reading (`tfds_documents`, called by `growlm.data.sources.load_corpus`) needs
only a dataset prepared in array_record format: no TensorFlow is installed, so
`as_dataset` / `tfds.as_numpy` are out and `as_data_source` is the way in.

Each record's "text" feature is one document. Writing such a dataset from any
source is `growlm.data.tfds_prepare.prepare_text_dataset`; reading needs no builder
class: `tfds.builder(name, data_dir=...)` falls back to the files on disk,
which is what `load_corpus` does in a fresh process.
"""

from __future__ import annotations

import re

from growlm import fs, transfer
from growlm.data import documents
from growlm.errors import GrowlmError

EVAL_SPLITS = ("validation", "eval", "test")  # Tried in this order for split="eval".
_TFDS_SPEC = re.compile(r"^([A-Za-z0-9_./-]+(?::\d+\.\d+\.\d+)?)(?::(.+))?$")
_READ_BATCH = 1024


def _open(rest: str, data_dir: str | None):
  """(builder, name, split or None, available splits) of "tfds:" + `rest`."""
  match = _TFDS_SPEC.match(rest)
  if not match:
    raise GrowlmError(f"tfds source 'tfds:{rest}' not understood (accepted: 'tfds:NAME[:SPLIT]', "
                      "NAME may carry ':VERSION')")
  name, tfds_split = match.group(1), match.group(2)
  if data_dir and fs.is_url(data_dir):   # gs://: this dataset's files through a local mirror
    base = name.split("/")[0].split(":")[0]
    if not fs.isdir(fs.join(data_dir, base)):
      raise GrowlmError(f"tfds dataset {name!r} is not prepared under data_dir={data_dir!r} "
                        f"(no {fs.join(data_dir, base)})")
    transfer.mirror(fs.join(data_dir, base))
    data_dir = transfer.mirror_path(data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # Falls back to the files under data_dir when no builder class is
    # registered, so a fresh process needs no growlm builder.
    builder = tfds.builder(name, data_dir=data_dir)
    available = list(builder.info.splits.keys())
  except Exception as e:  # tfds raises many types for "not there".
    raise GrowlmError(f"tfds dataset {name!r} is not prepared under data_dir={data_dir!r} "
                      f"({type(e).__name__})") from e
  if not available:
    raise GrowlmError(f"tfds dataset {name!r} has no prepared splits under data_dir={data_dir!r}")
  return builder, name, tfds_split, available


def _sources(builder, name: str, chosen: list[str]) -> list:
  """Random-access sources of the chosen splits (array_record only: no TensorFlow here)."""
  try:
    return builder.as_data_source(split=chosen)
  except Exception as e:
    raise GrowlmError(f"tfds dataset {name!r} cannot be read without TensorFlow; prepare it "
                      f"with file_format='array_record' ({type(e).__name__})") from e


def _text(record, text_field: str, where: str) -> str:
  """A record's text feature as str; a missing feature is a GrowlmError."""
  if text_field not in record:
    raise GrowlmError(f"tfds dataset {where} has no feature {text_field!r} (features: "
                      f"{', '.join(map(str, record))}); accepted: another feature named by "
                      "data.text_field (growlm.main) or --text_field (growlm.prepare)")
  text = record[text_field]
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def split_lengths(rest: str, data_dir: str | None) -> tuple[str, dict[str, int]]:
  """(NAME, {split: number of records}) of "tfds:" + `rest`, which must name no split."""
  builder, name, tfds_split, available = _open(rest, data_dir)
  if tfds_split is not None:
    raise GrowlmError(f"source 'tfds:{rest}': prepare takes the whole dataset (its train and "
                      "eval splits); accepted: 'tfds:NAME' without ':SPLIT'")
  return name, {s: int(builder.info.splits[s].num_examples) for s in available}


def read_range(name: str, split: str, start: int, stop: int, data_dir: str | None,
               text_field: str = "text") -> list[tuple[str, str]]:
  """(id, text) of records [start, stop) of one split, ids as `tfds_documents` gives them."""
  builder, name, _, _ = _open(name, data_dir)
  source = _sources(builder, name, [split])[0]
  keys = list(range(start, stop))
  docs = []
  for i, record in zip(keys, source.__getitems__(keys)):
    docs.append((f"{split}/{i}", _text(record, text_field, f"{name}/{split}")))
  return docs


def tfds_documents(rest: str, split: str, data_dir: str | None,
                   max_bytes: int, text_field: str = "text") -> list[tuple[str, str]]:
  """(id, text) of each record's text feature for "tfds:" + `rest`; see `sources.load_corpus`.

  `rest` is NAME[:SPLIT], NAME possibly with ":X.Y.Z". Without SPLIT, train ->
  "train", eval -> the first of validation/eval/test, all -> every split
  (sorted by name). `max_bytes` caps the documents read, cutting the last one.
  """
  builder, name, tfds_split, available = _open(rest, data_dir)
  if tfds_split is not None:
    chosen = [tfds_split]
  elif split == "train":
    chosen = ["train"]
  elif split == "eval":
    chosen = [s for s in EVAL_SPLITS if s in available][:1]
  else:
    chosen = sorted(available)
  if not chosen or chosen[0].split("[")[0] not in available:
    wanted = repr(tfds_split) if tfds_split else f"for {split!r}"
    raise GrowlmError(f"tfds dataset {name!r} has no split {wanted} (available: "
                      f"{', '.join(sorted(available))})")
  sources = _sources(builder, name, chosen)
  docs, total = [], 0
  for split_name, source in zip(chosen, sources):
    for start in range(0, len(source), _READ_BATCH):
      keys = list(range(start, min(start + _READ_BATCH, len(source))))
      for i, record in zip(keys, source.__getitems__(keys)):
        text = _text(record, text_field, f"{name}/{split_name}")
        if max_bytes:
          if total >= max_bytes:
            return docs
          text = documents.truncate_utf8(text, max_bytes - total)
        total += len(text.encode("utf-8"))
        docs.append((f"{split_name}/{i}", text))
  return docs
