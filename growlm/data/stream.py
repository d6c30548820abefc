"""Streaming: training batches from prepared token shards through grain, and the one way in.

`PreparedIterator` is `DataIterator`'s streaming twin (same interface, same packing): window j
of a split is tokens[j*L : j*L + L + 1] of its token stream, and global sample g = step * B + i
of training takes window perm_e(g mod W) in epoch e = g // W, where perm_e is grain's
`index_shuffle` (a keyed bijection of [0, W) computed per index: O(1) memory, no permutation
array) seeded by (data.seed + e). Process p of P reads only rows [p*B/P, (p+1)*B/P) of each
global batch, so the processes' rows are disjoint and together make the global batch, whatever
P is. A grain `MapDataset` over steps reads the rows (a few array_record records each) in
background threads and prefetches; its iterator state goes into every checkpoint, so a resumed
run sees exactly the batches an uninterrupted one would have.

`train_iterator`, `token_stream` and `manifest_of` pick the in-memory (pipeline.py) or the
prepared path from the source spec, so the trainer and the grow commands never ask which.
"""

from __future__ import annotations

import numpy as np

from growlm import fs, transfer
from growlm.data import pipeline
from growlm.data import shards
from growlm.data import sources
from growlm.data import units
from growlm.errors import GrowlmError

_MAX_STEPS = 1 << 40          # the grain dataset's length: steps, not data
_SEED_MOD = 1 << 32


def prepared_dir(spec: str) -> str | None:
  """DIR of a "prepared:DIR" spec, else None."""
  if isinstance(spec, str) and spec.startswith(sources.PREPARED):
    directory = spec[len(sources.PREPARED):]
    if not directory:
      raise GrowlmError("source 'prepared:' names no directory; accepted: 'prepared:DIR'")
    return directory
  return None


def open_split(spec: str, split: str, tokenizer=None) -> shards.PreparedSplit:
  """The checked split of a "prepared:DIR" spec; its tokenizer must be `tokenizer`'s. A gs://
  DIR is read through a local mirror (growlm.transfer.mirror: array_record reads local files only),
  copied once per host and reused while the objects are unchanged."""
  directory = prepared_dir(spec)
  if fs.is_url(directory):
    fs.check(directory, "prepared data")
    if not fs.isfile(fs.join(directory, shards.MANIFEST)):
      raise GrowlmError(f"prepared data {directory} has no {shards.MANIFEST}; accepted: a "
                        "directory written by python -m growlm.prepare (to the end)")
    directory = transfer.mirror(directory)
  if split not in shards.SPLITS:
    raise GrowlmError(f"prepared data {directory} split {split!r} not accepted (accepted: "
                      f"{', '.join(shards.SPLITS)})")
  manifest = shards.read_manifest(directory)
  tok = manifest["tokenizer"]
  if tokenizer is not None and tok.get("sha256") != tokenizer.sha256:
    raise GrowlmError(
        f"prepared data {directory} was tokenized with {tok.get('spec')!r} (vocab "
        f"{tok.get('vocab_size')}), not data.tokenizer={tokenizer.name!r} (vocab "
        f"{tokenizer.vocab_size}); accepted: the tokenizer it was prepared with")
  return shards.PreparedSplit(directory, split, manifest).open()


def check_source(spec: str, *, data_dir: str | None, text_field: str = "text") -> None:
  """The cheap half of reading a source, for a launcher that starts its run later: the files or
  dataset exist and the first row has the text field; prepared data has its manifest. Reads no
  corpus (a gs:// prepared directory is not mirrored)."""
  directory = prepared_dir(spec)
  if directory is None:
    found = units.list_units(spec, data_dir=data_dir)
    if found:
      units.check_text_field(found[0], text_field, data_dir)
  elif not fs.is_url(directory):
    shards.read_manifest(directory)
  elif not fs.isfile(fs.join(fs.check(directory, "prepared data"), shards.MANIFEST)):
    raise GrowlmError(f"prepared data {directory} has no {shards.MANIFEST}; accepted: a "
                      "directory written by python -m growlm.prepare (to the end)")


def _manifest(part: shards.PreparedSplit, spec: str) -> dict:
  """What a run records of the prepared split it read (data_manifest.json)."""
  m = part.manifest
  return {"spec": spec, "split": part.split, "prepared_sha256": m["sha256"],
          "source": m["source"], "source_sha256": m["source_sha256"],
          "eval_fraction": m["eval_fraction"], "tokenizer": m["tokenizer"]["spec"],
          "vocab_size": m["tokenizer"]["vocab_size"], "n_tokens": part.n_tokens,
          "n_bytes": part.n_bytes, "tokens_sha256": part.sha256}


class PreparedIterator:
  """Seeded, resumable, process-sharded training batches streamed from a prepared split."""

  def __init__(self, part: shards.PreparedSplit, seq_len: int, global_batch: int, seed: int, *,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True,
               read_threads: int = 2, prefetch: int = 4, spec: str = ""):
    """See the module docstring; process p gets rows [p*B/P, (p+1)*B/P) of each global batch."""
    import grain  # pylint: disable=g-import-not-at-top
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise GrowlmError(f"data seed={seed!r} not accepted (accepted: an int >= 0)")
    self.part = part
    self.n_windows = pipeline.check_layout(
        part.n_tokens, seq_len, global_batch, process_index, process_count,
        f"prepared data {part.directory!r} split {part.split!r}")
    self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
    self.shuffle = bool(shuffle)
    self.local_batch = self.global_batch // process_count
    self._row0 = process_index * self.local_batch
    self._sha = part.sha256
    self.manifest = _manifest(part, spec)
    dataset = grain.MapDataset.range(_MAX_STEPS).map(self.batch_at)
    self._dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    self._iter = iter(self._dataset)
    self.step = 0

  def windows_at(self, step: int) -> np.ndarray:
    """Window indices of this process's rows at `step`."""
    import grain  # pylint: disable=g-import-not-at-top
    g_B = step * self.global_batch + self._row0 + np.arange(self.local_batch, dtype=np.int64)
    if not self.shuffle:
      return g_B % self.n_windows
    epoch_B, pos_B = np.divmod(g_B, self.n_windows)
    return np.asarray([grain.experimental.index_shuffle(
        int(pos), max_index=self.n_windows - 1, seed=int(self.seed + epoch) % _SEED_MOD, rounds=4)
        for epoch, pos in zip(epoch_B, pos_B)], dtype=np.int64)

  def batch_at(self, step: int) -> dict:
    """The process-local batch {"inputs", "targets"}: int32[B_local, L] at `step`."""
    L = self.seq_len
    rows = self.part.read_many([(int(w) * L, int(w) * L + L + 1) for w in self.windows_at(step)])
    rows_BxL1 = np.stack(rows)
    return {"inputs": np.ascontiguousarray(rows_BxL1[:, :-1]),
            "targets": np.ascontiguousarray(rows_BxL1[:, 1:])}

  def __iter__(self) -> "PreparedIterator":
    return self

  def __next__(self) -> dict:
    batch = next(self._iter)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position (with grain's iterator state); `set_state` resumes here."""
    return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len,
            "global_batch": self.global_batch, "manifest_sha256": self._sha,
            "grain": self._iter.get_state()}

  def set_state(self, state: dict) -> None:
    """Resumes from `get_state()` output; the data and layout must be the same."""
    pipeline.check_state(state, self.get_state())
    grain_state = state.get("grain")
    if not isinstance(grain_state, dict) or grain_state.get("next_index") != state["step"]:
      raise GrowlmError(f"data iterator state has no grain state for step {state['step']} (a "
                        "checkpoint of another data pipeline?)")
    self._iter.set_state(grain_state)
    self.step = int(state["step"])


def train_iterator(spec: str, tokenizer, *, seq_len: int, global_batch: int, seed: int,
                   process_index: int, process_count: int, eval_fraction: float, max_bytes: int,
                   data_dir: str | None, text_field: str = "text"):
  """The training iterator of a source: streamed for "prepared:DIR", else in memory."""
  if prepared_dir(spec) is not None:
    if max_bytes:
      raise GrowlmError("data.max_bytes applies to in-memory sources; a 'prepared:' source is "
                        "used whole (accepted: data.max_bytes=0, or prepare a smaller source)")
    return PreparedIterator(open_split(spec, "train", tokenizer), seq_len, global_batch, seed,
                            process_index=process_index, process_count=process_count, spec=spec)
  stream = token_stream(spec, "train", tokenizer, eval_fraction=eval_fraction,
                        max_bytes=max_bytes, data_dir=data_dir, text_field=text_field)
  return pipeline.DataIterator(stream, seq_len, global_batch, seed, process_index=process_index,
                               process_count=process_count)


def token_stream(spec: str, split: str, tokenizer, *, eval_fraction: float, max_bytes: int,
                 data_dir: str | None, max_tokens: int = 0,
                 text_field: str = "text") -> pipeline.TokenStream:
  """A split as an in-memory TokenStream. A prepared split gives its first `max_tokens` tokens
  (all with 0): what evaluation reads, since eval takes consecutive windows from the start."""
  if prepared_dir(spec) is None:
    return pipeline.tokenize_corpus(sources.load_corpus(
        spec, split, eval_fraction=eval_fraction, max_bytes=max_bytes, data_dir=data_dir,
        text_field=text_field),
        tokenizer)
  if split == "all":
    raise GrowlmError(f"source {spec!r}: split 'all' not accepted for prepared data (accepted: "
                      f"{', '.join(shards.SPLITS)})")
  part = open_split(spec, split, tokenizer)
  n = part.n_tokens if not max_tokens else min(part.n_tokens, int(max_tokens))
  return pipeline.TokenStream(tokens=part.read(0, n), n_bytes=round(n * part.bytes_per_token),
                              manifest={**_manifest(part, spec), "tokens_read": n},
                              bytes_per_token=part.bytes_per_token)
