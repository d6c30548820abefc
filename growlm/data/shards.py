"""Token shards: the on-disk form of prepared data, written by growlm.prepare, read by stream.py.

A prepared directory holds, per split ("train", "eval"), the split's token stream (each
document preceded by the tokenizer's end-of-text id, documents in source order: exactly what
`tokenize_corpus` builds in memory) cut into array_record shards, one per part of the source:

  plan.json                          what is being prepared (written first)
  part-00003-of-00012.json           part 3 is complete: its shards, token counts and sha256s
  train-00003-of-00012.array_record  part 3's train tokens, records of RECORD_TOKENS ids
  eval-00003-of-00012.array_record   part 3's eval tokens (absent when the part has none)
  manifest.json                      written last: the prepare is complete

A record is RECORD_TOKENS little-endian token ids (uint16 when the vocabulary fits, else
uint32); a shard's last record may be shorter. Records are single-record chunks (group_size 1)
compressed with zstd, so any token range is read with a few random accesses. Every shard is
written under a .tmp name and renamed when closed; the part's marker comes after, so a shard
without its marker is never taken as complete.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os

import numpy as np

from growlm.errors import GrowlmError
from growlm.fs import read_json_object

FORMAT = "growlm-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
RECORD_TOKENS = 4096
SPLITS = ("train", "eval")
_WRITER_OPTIONS = "group_size:1,zstd:1"


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(split: str, part: int, n_parts: int) -> str:
  """The file name of a part's shard of one split."""
  return f"{split}-{part:05d}-of-{n_parts:05d}.array_record"


def marker_name(part: int, n_parts: int) -> str:
  """The file name of a part's completion marker."""
  return f"part-{part:05d}-of-{n_parts:05d}.json"


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


class ShardWriter:
  """Appends token ids to one shard in records of `record_tokens`; `close` renames it in place."""

  def __init__(self, path: str, dtype: np.dtype, record_tokens: int = RECORD_TOKENS):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.path, self.dtype, self.record_tokens = path, np.dtype(dtype), int(record_tokens)
    self._tmp = path + ".tmp"
    if os.path.exists(self._tmp):
      os.remove(self._tmp)
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, _WRITER_OPTIONS)
    self._pending: list[np.ndarray] = []
    self._n_pending = 0
    self.n_tokens = 0
    self.n_records = 0

  def add(self, ids: np.ndarray) -> None:
    """Appends ids (any integer dtype; they must fit the shard's dtype)."""
    self._pending.append(np.asarray(ids).astype(self.dtype, copy=False))
    self._n_pending += len(ids)
    self.n_tokens += len(ids)
    if self._n_pending >= self.record_tokens:
      self._flush(final=False)

  def _flush(self, final: bool) -> None:
    data = np.concatenate(self._pending) if self._pending else np.zeros((0,), self.dtype)
    full = len(data) if final else len(data) - len(data) % self.record_tokens
    for start in range(0, full, self.record_tokens):
      self._writer.write(data[start:start + self.record_tokens].astype("<" + self.dtype.str[1:])
                         .tobytes())
      self.n_records += 1
    rest = data[full:]
    self._pending, self._n_pending = ([rest], len(rest)) if len(rest) else ([], 0)

  def close(self) -> dict:
    """Writes the last record, renames the shard into place; returns its marker entry."""
    self._flush(final=True)
    self._writer.close()
    with open(self._tmp, "rb") as f:
      os.fsync(f.fileno())
    entry = {"file": os.path.basename(self.path), "n_tokens": self.n_tokens,
             "n_records": self.n_records, "file_bytes": os.path.getsize(self._tmp),
             "sha256": file_sha256(self._tmp)}
    os.replace(self._tmp, self.path)
    return entry

  def abandon(self) -> None:
    """Drops the unfinished shard."""
    try:
      self._writer.close()
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)


def read_manifest(directory: str) -> dict:
  """The manifest of a complete prepared directory; a clear error for anything else."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    hint = (" (it holds an unfinished prepare: rerun the same growlm.prepare command)"
            if os.path.isfile(os.path.join(directory, PLAN)) else "")
    raise GrowlmError(f"prepared data {directory} has no {MANIFEST}{hint}; accepted: a directory "
                      "written by `python -m growlm.prepare`")
  manifest = read_json_object(path, "prepared data manifest")
  if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
    raise GrowlmError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest (format "
                      f"{manifest.get('format')!r} v{manifest.get('format_version')!r})")
  for key in ("tokenizer", "dtype", "record_tokens", "splits", "sha256"):
    if key not in manifest:
      raise GrowlmError(f"prepared data manifest {path} has no {key!r}")
  return manifest


@dataclasses.dataclass
class PreparedSplit:
  """One split of a prepared directory: random access to any token range, nothing loaded whole.

  Memory is the shard table (a few numbers per shard) and array_record's readers: independent
  of the corpus size.
  """
  directory: str
  split: str
  manifest: dict

  def __post_init__(self):
    info = self.manifest["splits"].get(self.split)
    if info is None:
      raise GrowlmError(f"prepared data {self.directory} has no split {self.split!r} (has: "
                        f"{', '.join(self.manifest['splits'])})")
    self.shards = [s for s in info["shards"] if s["n_tokens"] > 0]
    self.n_tokens = int(info["n_tokens"])
    self.n_bytes = int(info["n_bytes"])
    self.sha256 = info["sha256"]
    self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
    self.record_tokens = int(self.manifest["record_tokens"])
    if sum(s["n_tokens"] for s in self.shards) != self.n_tokens:
      raise GrowlmError(f"prepared data manifest {self.directory}: split {self.split!r} says "
                        f"{self.n_tokens} tokens but its shards add up to "
                        f"{sum(s['n_tokens'] for s in self.shards)}")
    self._token_starts = np.cumsum([0] + [s["n_tokens"] for s in self.shards]).tolist()
    self._record_starts = np.cumsum([0] + [s["n_records"] for s in self.shards]).tolist()
    self._source = None

  @property
  def bytes_per_token(self) -> float:
    """UTF-8 bytes of source text per token over the whole split."""
    return self.n_bytes / max(self.n_tokens, 1)

  def open(self) -> "PreparedSplit":
    """Opens the shards and checks them against the manifest (record counts, last records)."""
    import grain  # pylint: disable=g-import-not-at-top
    paths = [os.path.join(self.directory, s["file"]) for s in self.shards]
    for path, shard in zip(paths, self.shards):
      if not os.path.isfile(path):
        raise GrowlmError(f"prepared data {self.directory}: shard {shard['file']} is missing")
      if os.path.getsize(path) != shard["file_bytes"]:
        raise GrowlmError(f"prepared data {self.directory}: shard {shard['file']} has "
                          f"{os.path.getsize(path)} bytes, its manifest says "
                          f"{shard['file_bytes']}: the shards do not match the manifest")
    if not paths:
      raise GrowlmError(f"prepared data {self.directory} split {self.split!r} holds no tokens")
    try:
      self._source = grain.sources.ArrayRecordDataSource(paths)
      n_records = len(self._source)
    except Exception as e:  # array_record raises RuntimeError with C++ text
      raise GrowlmError(f"prepared data {self.directory} split {self.split!r}: a shard cannot be "
                        f"read ({(str(e).splitlines() or [type(e).__name__])[0]})") from e
    if n_records != self._record_starts[-1]:
      raise GrowlmError(f"prepared data {self.directory} split {self.split!r}: the shards hold "
                        f"{n_records} records, the manifest says {self._record_starts[-1]}")
    lasts = [r - 1 for r in self._record_starts[1:]]
    for shard, record in zip(self.shards, self._get(lasts)):
      expected = shard["n_tokens"] - (shard["n_records"] - 1) * self.record_tokens
      if len(record) != expected * self.dtype.itemsize:
        raise GrowlmError(f"prepared data {self.directory}: shard {shard['file']} does not "
                          "match the manifest (its last record has the wrong length)")
    return self

  def _get(self, records: list[int]) -> list[bytes]:
    # One read at a time: the batched read starts a thread pool per call, three times slower
    # for the few records of a batch; grain's threads already read batches in parallel.
    try:
      return [self._source[r] for r in records]
    except Exception as e:
      raise GrowlmError(f"prepared data {self.directory} split {self.split!r}: a shard cannot be "
                        f"read ({(str(e).splitlines() or [type(e).__name__])[0]})") from e

  def _records_of(self, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(global record, first token wanted in it, end token) covering tokens [start, stop)."""
    out = []
    pos = start
    while pos < stop:
      shard = bisect.bisect_right(self._token_starts, pos) - 1
      local = pos - self._token_starts[shard]
      record, offset = divmod(local, self.record_tokens)
      shard_end = self._token_starts[shard + 1]
      take = min(stop, shard_end, pos + self.record_tokens - offset) - pos
      out.append((self._record_starts[shard] + record, offset, offset + take))
      pos += take
    return out

  def read_many(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
    """int32 tokens of each [start, stop) range, read with one batched call."""
    if self._source is None:
      self.open()
    plans = []
    for start, stop in ranges:
      if not 0 <= start <= stop <= self.n_tokens:
        raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
      plans.append(self._records_of(start, stop))
    wanted = sorted({r for plan in plans for r, _, _ in plan})
    data = dict(zip(wanted, self._get(wanted)))
    out = []
    for plan in plans:
      parts = [np.frombuffer(data[r], dtype=self.dtype)[a:b] for r, a, b in plan]
      out.append(np.concatenate(parts).astype(np.int32) if parts
                 else np.zeros((0,), np.int32))
    return out

  def read(self, start: int, stop: int) -> np.ndarray:
    """int32 tokens [start, stop) of the split's stream."""
    return self.read_many([(start, stop)])[0]
