"""Pipeline: a Corpus -> one token stream -> packed, seeded, resumable batches.

Shape letters: B = batch rows (global or process-local, as named), L = sequence
length, N = number of tokens in a stream, W = number of packed windows.

Tokens: `tokenize_corpus` encodes each document, in order, behind the
tokenizer's end-of-text id and concatenates them into one int32[N] stream.

Packing: window j is tokens[j*L : j*L + L + 1] (stride L, one token of overlap),
inputs = window[:-1], targets = window[1:], so every token but the first is a
target exactly once per epoch. `DataIterator` shuffles windows per epoch for
training; `eval_batches` takes consecutive windows in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from growlm.data import documents
from growlm.errors import GrowlmError


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One int32 token array: each document preceded by the tokenizer's eot_id."""
  tokens: np.ndarray
  n_bytes: int
  manifest: dict
  bytes_per_token: float


def tokenize_corpus(corpus: documents.Corpus, tokenizer: Any) -> TokenStream:
  """Tokenizes and concatenates a corpus; manifest["tokens_sha256"] pins the exact tokens."""
  eot_N = np.asarray([tokenizer.eot_id], dtype=np.int32)
  parts = []
  encode_batch = getattr(tokenizer, "encode_batch", None)
  encoded = (encode_batch(corpus.documents) if encode_batch is not None
             else [tokenizer.encode(doc) for doc in corpus.documents])
  for ids in encoded:
    parts.append(eot_N)
    parts.append(ids.astype(np.int32, copy=False))
  tokens_N = np.ascontiguousarray(np.concatenate(parts), dtype=np.int32)
  manifest = dict(corpus.manifest)
  manifest.update({
      "tokenizer": tokenizer.name, "vocab_size": int(tokenizer.vocab_size),
      "n_tokens": int(tokens_N.size), "tokens_sha256": documents._sha(tokens_N.tobytes()),
  })
  return TokenStream(tokens=tokens_N, n_bytes=corpus.n_bytes, manifest=manifest,
                     bytes_per_token=corpus.n_bytes / tokens_N.size)


def num_windows(stream: TokenStream, seq_len: int) -> int:
  """How many packed windows of `seq_len` targets the stream holds."""
  return _windows(stream.tokens.size, seq_len)


def _windows(n_tokens: int, seq_len: int) -> int:
  """Packed windows of `seq_len` targets in `n_tokens` tokens (stride seq_len, one overlap)."""
  return max(0, (int(n_tokens) - 1) // seq_len)


def eval_tokens(seq_len: int, global_batch: int, n_batches: int) -> int:
  """The tokens `eval_batches` reads at most: the first n_batches * global_batch windows."""
  return n_batches * global_batch * seq_len + 1


def check_layout(n_tokens: int, seq_len: int, global_batch: int, process_index: int,
                 process_count: int, what: str) -> int:
  """Validates the batch layout over a stream of `n_tokens`; returns the number of windows."""
  for field, value, low in (("seq_len", seq_len, 1), ("global_batch", global_batch, 1),
                            ("process_count", process_count, 1),
                            ("process_index", process_index, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise GrowlmError(f"{field}={value!r} not accepted (accepted: an int >= {low})")
  if process_index >= process_count:
    raise GrowlmError(f"process_index={process_index} not accepted (accepted: 0.."
                      f"{process_count - 1} for process_count={process_count})")
  if global_batch % process_count:
    raise GrowlmError(f"global_batch={global_batch} not accepted: it must be divisible by "
                      f"process_count={process_count}")
  n_windows = _windows(n_tokens, seq_len)
  if n_windows < global_batch:
    raise GrowlmError(
        f"{what} has {n_tokens} tokens: too few for one batch of {global_batch} x {seq_len} "
        f"(needs {global_batch * seq_len + 1})")
  return n_windows


def _check_layout(stream: TokenStream, seq_len: int, global_batch: int,
                  process_index: int, process_count: int) -> int:
  """Validates the batch layout; returns the number of windows."""
  return check_layout(stream.tokens.size, seq_len, global_batch, process_index, process_count,
                      f"dataset {stream.manifest.get('spec')!r} split "
                      f"{stream.manifest.get('split')!r}")


def check_state(state: dict, mine: dict) -> None:
  """Refuses an iterator state of other data or another layout, or with a bad step."""
  if not isinstance(state, dict):
    raise GrowlmError(f"data iterator state must be a dict, got {type(state).__name__}")
  for field in ("seed", "seq_len", "global_batch", "manifest_sha256"):
    if field not in state:
      raise GrowlmError(f"data iterator state has no {field!r} (needs: {', '.join(mine)})")
    if state[field] != mine[field]:
      raise GrowlmError(
          f"data iterator state {field}={state[field]!r} differs from this run's "
          f"{mine[field]!r}: a resumed run must see the same data")
  step = state.get("step")
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise GrowlmError(f"data iterator state step={step!r} not accepted (accepted: an int >= 0)")


def _gather(tokens_N: np.ndarray, windows_B: np.ndarray, seq_len: int) -> dict:
  """Packed rows for the given window indices."""
  index_BxL1 = windows_B[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  rows_BxL1 = tokens_N[index_BxL1]
  return {"inputs": np.ascontiguousarray(rows_BxL1[:, :-1]),
          "targets": np.ascontiguousarray(rows_BxL1[:, 1:])}


class DataIterator:
  """Deterministic, seeded, resumable training batches; each process gathers its own rows.

  Global sample g = step * global_batch + i lies in epoch g // W at position
  g % W of that epoch's permutation of the W windows, so a batch is a pure
  function of (tokens, seq_len, global_batch, seed, step).
  """

  def __init__(self, stream: TokenStream, seq_len: int, global_batch: int, seed: int, *,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True):
    """See class docstring; process p gets rows [p*B/P, (p+1)*B/P) of each global batch."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise GrowlmError(f"data seed={seed!r} not accepted (accepted: an int >= 0)")
    self.n_windows = _check_layout(stream, seq_len, global_batch, process_index, process_count)
    self.stream = stream
    self.manifest = stream.manifest
    self.seq_len = int(seq_len)
    self.global_batch = int(global_batch)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.local_batch = self.global_batch // process_count
    self._row0 = process_index * self.local_batch
    self._manifest_sha = stream.manifest["tokens_sha256"]
    self._perms: dict[int, np.ndarray] = {}
    self.step = 0

  def _permutation(self, epoch: int) -> np.ndarray:
    # A batch spans at most two epochs, so two cached permutations suffice.
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      rng = np.random.default_rng([self.seed, epoch])
      self._perms[epoch] = rng.permutation(self.n_windows)
    return self._perms[epoch]

  def windows_at(self, step: int) -> np.ndarray:
    """Window indices of this process's rows at `step`."""
    g_B = step * self.global_batch + self._row0 + np.arange(self.local_batch, dtype=np.int64)
    if not self.shuffle:
      return g_B % self.n_windows
    epoch_B, pos_B = np.divmod(g_B, self.n_windows)
    windows_B = np.empty_like(g_B)
    for epoch in np.unique(epoch_B):
      mask = epoch_B == epoch
      windows_B[mask] = self._permutation(int(epoch))[pos_B[mask]]
    return windows_B

  def batch_at(self, step: int) -> dict:
    """The process-local batch {"inputs", "targets"}: int32[B_local, L] at `step`."""
    return _gather(self.stream.tokens, self.windows_at(int(step)), self.seq_len)

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position; `set_state` on it resumes exactly here."""
    return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len,
            "global_batch": self.global_batch, "manifest_sha256": self._manifest_sha}

  def set_state(self, state: dict) -> None:
    """Resumes from `get_state()` output; the data and layout must be the same."""
    check_state(state, self.get_state())
    self.step = int(state["step"])


def eval_batches(stream: TokenStream, seq_len: int, global_batch: int, n_batches: int, *,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The first min(n_batches, W // global_batch) batches of consecutive windows, in order."""
  n_windows = _check_layout(stream, seq_len, global_batch, process_index, process_count)
  if isinstance(n_batches, bool) or not isinstance(n_batches, (int, np.integer)) or n_batches < 1:
    raise GrowlmError(f"n_batches={n_batches!r} not accepted (accepted: an int >= 1)")
  local = global_batch // process_count
  rows_B = process_index * local + np.arange(local, dtype=np.int64)
  count = min(int(n_batches), n_windows // global_batch)
  return [_gather(stream.tokens, k * global_batch + rows_B, seq_len) for k in range(count)]
