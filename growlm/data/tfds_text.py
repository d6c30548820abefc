"""tensorflow-datasets text: read the documents of a "tfds:" source.

Reading (`tfds_documents`, called by `growlm.data.sources.load_corpus`) needs
only a dataset prepared in array_record format: no TensorFlow is installed, so
`as_dataset` / `tfds.as_numpy` are out and `as_data_source` is the way in.

Each record's "text" feature is one document. Writing such a dataset from any
source is `growlm.data.prepare.prepare_text_dataset`; reading needs no builder
class: `tfds.builder(name, data_dir=...)` falls back to the files on disk,
which is what `load_corpus` does in a fresh process.
"""

from __future__ import annotations

import re

from growlm.data import documents
from growlm.errors import GrowlmError

_EVAL_SPLITS = ("validation", "eval", "test")  # Tried in this order for split="eval".
_TFDS_SPEC = re.compile(r"^([A-Za-z0-9_./-]+(?::\d+\.\d+\.\d+)?)(?::(.+))?$")
_READ_BATCH = 1024


def tfds_documents(rest: str, split: str, data_dir: str | None,
                   max_bytes: int) -> list[tuple[str, str]]:
  """(id, text) of each record's "text" for "tfds:" + `rest`; see `sources.load_corpus`.

  `rest` is NAME[:SPLIT], NAME possibly with ":X.Y.Z". Without SPLIT, train ->
  "train", eval -> the first of validation/eval/test, all -> every split
  (sorted by name). `max_bytes` caps the documents read, cutting the last one.
  """
  match = _TFDS_SPEC.match(rest)
  if not match:
    raise GrowlmError(f"tfds source 'tfds:{rest}' not understood (accepted: 'tfds:NAME[:SPLIT]', "
                      "NAME may carry ':VERSION')")
  name, tfds_split = match.group(1), match.group(2)
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
  if tfds_split is not None:
    chosen = [tfds_split]
  elif split == "train":
    chosen = ["train"]
  elif split == "eval":
    chosen = [s for s in _EVAL_SPLITS if s in available][:1]
  else:
    chosen = sorted(available)
  if not chosen or chosen[0].split("[")[0] not in available:
    wanted = repr(tfds_split) if tfds_split else f"for {split!r}"
    raise GrowlmError(f"tfds dataset {name!r} has no split {wanted} (available: "
                      f"{', '.join(sorted(available))})")
  try:
    sources = builder.as_data_source(split=chosen)
  except Exception as e:
    raise GrowlmError(f"tfds dataset {name!r} cannot be read without TensorFlow; prepare it "
                      f"with file_format='array_record' ({type(e).__name__})") from e
  docs, total = [], 0
  for split_name, source in zip(chosen, sources):
    for start in range(0, len(source), _READ_BATCH):
      keys = list(range(start, min(start + _READ_BATCH, len(source))))
      for i, record in zip(keys, source.__getitems__(keys)):
        text = record["text"]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        if max_bytes:
          if total >= max_bytes:
            return docs
          text = documents.truncate_utf8(text, max_bytes - total)
        total += len(text.encode("utf-8"))
        docs.append((f"{split_name}/{i}", text))
  return docs
