"""Prepare: write any source's documents as a tensorflow-datasets text dataset.

The dataset has one feature, {"text": Text}, and splits "train" and "eval" made
by the same rule as `growlm.data.sources.load_corpus`, so

  spec = prepare_text_dataset("file:input.txt", data_dir)   # -> "tfds:growlm_text"
  load_corpus(spec, "train", data_dir=data_dir)

gives the same documents, in the same order, as load_corpus("file:input.txt",
"train"). It is written as array_record (readable without TensorFlow through
`as_data_source` / grain, see tfds_text.py) with shuffling disabled to keep
document order.

Names: tfds names a dataset after its builder class, so one builder class is
made per dataset name at call time, kept out of tfds's global registry. Readers
need no class: `tfds.builder(name, data_dir=...)` falls back to the files on
disk, which is what `load_corpus` does in a fresh process.
"""

from __future__ import annotations

import re
from pathlib import Path

from growlm.data import documents
from growlm.data import sources
from growlm.errors import GrowlmError

VERSION = "1.0.0"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLITS = ("train", "eval")


def _builder_class(name: str, docs_by_split: dict, source_meta: dict):
  """A GeneratorBasedBuilder subclass named `name` that writes `docs_by_split`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top

  # tfds registers every subclass in a global registry when it is created; a
  # second dataset of the same name (a second call, tests) would collide.
  with registered.skip_registration():

    class GrowlmText(tfds.core.GeneratorBasedBuilder):
      """Local text documents, one example each, in "train" and "eval" splits."""

      VERSION = tfds.core.Version(VERSION)
      # tfds looks for checksum files next to a builder's module, and for a
      # module inside a package that probe imports the absent
      # `importlib_resources`; there is nothing to download, so no code path.
      code_path = None

      def _info(self):
        # A builder defined outside a tfds package must pass builder=self.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"growlm text dataset from {source_meta['source_spec']!r}",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # Otherwise tfds reorders examples by key hash.
            metadata=tfds.core.MetadataDict(source_meta),
        )

      def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the documents are in memory.
        return {split: self._generate_examples(split) for split in _SPLITS}

      def _generate_examples(self, split):
        for i, (_, text) in enumerate(docs_by_split[split]):
          yield f"{i:09d}", {"text": text}

    # The dataset name (and so its folder) comes from the class attribute.
    GrowlmText.name = name
  return GrowlmText


def prepare_text_dataset(source_spec: str, data_dir: str, *, name: str = "growlm_text",
                         eval_fraction: float = 0.1, max_bytes: int = 0) -> str:
  """Writes `source_spec` as tfds dataset `name` under `data_dir`; returns its "tfds:" spec.

  Args:
    source_spec: any spec `sources.load_corpus` accepts ("stdlib", "file:...").
    data_dir: tfds data dir; the dataset lands in data_dir/name/1.0.0.
    name: dataset name, snake_case, not a tfds catalogue name.
    eval_fraction: as in `load_corpus`.
    max_bytes: as in `load_corpus` (applied per split for file sources).

  Returns:
    "tfds:NAME", to pass to `load_corpus` together with `data_dir`.

  Re-preparing the same data is a no-op; a different source under an existing
  name is a GrowlmError rather than a silent reuse of stale data.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not isinstance(name, str) or not _NAME.match(name):
    raise GrowlmError(f"tfds dataset name {name!r} not accepted (accepted: snake_case, "
                      "[a-z][a-z0-9_]*)")
  if name in tfds.list_builders(with_community_datasets=False):
    raise GrowlmError(f"tfds dataset name {name!r} is a tfds catalogue dataset: pick another name")
  docs_by_split = {
      split: sources.load_documents(source_spec, split, eval_fraction=eval_fraction,
                                    max_bytes=max_bytes)
      for split in _SPLITS
  }
  for split in _SPLITS:
    if not docs_by_split[split]:
      raise GrowlmError(f"source {source_spec!r} has an empty {split!r} split "
                        f"(eval_fraction={eval_fraction}, max_bytes={max_bytes})")
  source_meta = {
      "source_spec": source_spec, "eval_fraction": eval_fraction, "max_bytes": max_bytes,
      **{f"{split}_sha256": documents.documents_sha256(docs_by_split[split])[0]
         for split in _SPLITS},
  }
  version_dir = Path(data_dir) / name / VERSION
  if (version_dir / "dataset_info.json").exists():
    existing = dict(tfds.builder_from_directory(str(version_dir)).info.metadata or {})
    if any(existing.get(k) != v for k, v in source_meta.items()):
      raise GrowlmError(f"{str(version_dir)!r} already holds other data (from "
                        f"{existing.get('source_spec')!r}): choose another name or data_dir")
    return f"tfds:{name}"
  tfds.disable_progress_bar()
  builder = _builder_class(name, docs_by_split, source_meta)(data_dir=str(data_dir))
  builder.download_and_prepare(file_format="array_record")
  return f"tfds:{name}"
