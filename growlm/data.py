"""Data: text sources -> documents -> tokens -> packed, resumable batches.

Shape letters: B = batch rows (global or process-local, as named), L = sequence
length, N = number of tokens in a stream, W = number of packed windows.

Source specs (`load_corpus`):
  "stdlib"                   the Python standard library's own .py files: the
                             embedded default corpus, present on every machine.
  "file:PATTERN[,PATTERN]"   local text files or globs; each file a document.
  "tfds:NAME[:SPLIT]"        a tensorflow-datasets dataset prepared in
                             array_record format under `data_dir` ("text" feature).

Train and eval never overlap: stdlib splits whole documents by a hash of their
path, files are split by their tail (the last `eval_fraction` of characters),
tfds datasets use their own splits. "all" is everything (eval-only datasets).

Packing: window j is tokens[j*L : j*L + L + 1] (stride L, one token of overlap),
inputs = window[:-1], targets = window[1:], so every token but the first is a
target exactly once per epoch.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import platform
import sysconfig
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from growlm.errors import GrowlmError

SPLITS = ("train", "eval", "all")
SOURCE_FORMS = "'stdlib', 'file:PATTERN[,PATTERN...]' or 'tfds:NAME[:SPLIT]'"
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_EOT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_PAD_TOKENS = ("<pad>",)
# Chunks cut just after a newline: byte-level BPE pre-tokenizers split at
# newlines anyway, so chunked encoding equals whole-text encoding there.
_ENCODE_CHUNK_CHARS = 1 << 16


# ----------------------------------------------------------------- tokenizers


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 ends a document, 257 pads."""

  name = "bytes"
  eot_id = 256
  pad_id = 257
  vocab_size = 258

  def encode(self, text: str) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as int32 ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes each text; same as `encode` on each."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Bytes back to text; special ids are dropped, bad UTF-8 is replaced."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
  """A local Hugging Face `tokenizer.json`, through the `tokenizers` library."""

  def __init__(self, path: str):
    """Loads `path`; its end-of-text token must be one of `_EOT_TOKENS`."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.name = str(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # The Rust error text can span lines.
      first = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise GrowlmError(
          f"tokenizer {str(path)!r} is not a readable Hugging Face tokenizer.json ({first})"
      ) from e
    self.vocab_size = self._tok.get_vocab_size()
    eot = self._find(_EOT_TOKENS)
    if eot is None:
      raise GrowlmError(
          f"tokenizer {str(path)!r} has no end-of-text token (accepted: {', '.join(_EOT_TOKENS)})")
    self.eot_id = eot
    pad = self._find(_PAD_TOKENS)
    self.pad_id = eot if pad is None else pad

  def _find(self, candidates: Sequence[str]) -> int | None:
    for token in candidates:
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return int(token_id)
    return None

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32, no special tokens added."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes each text, in newline-aligned chunks across the library's threads."""
    pieces, owner = [], []
    for i, text in enumerate(texts):
      for chunk in _newline_chunks(text, _ENCODE_CHUNK_CHARS):
        pieces.append(chunk)
        owner.append(i)
    encodings = self._tok.encode_batch(pieces, add_special_tokens=False) if pieces else []
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for i, enc in zip(owner, encodings):
      per_text[i].append(np.asarray(enc.ids, dtype=np.int32))
    return [np.concatenate(p) if p else np.zeros((0,), np.int32) for p in per_text]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids back to text, special tokens dropped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._tok.decode(ids, skip_special_tokens=True)


def _newline_chunks(text: str, size: int) -> list[str]:
  """Splits `text` into pieces of about `size` characters, each cut after a newline."""
  out, start = [], 0
  while len(text) - start > size:
    cut = text.find("\n", start + size)
    if cut < 0:
      break
    out.append(text[start:cut + 1])
    start = cut + 1
  if start < len(text):
    out.append(text[start:])
  return out


def make_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
  """'bytes' -> ByteTokenizer; a tokenizer.json path (or a folder holding one) -> HFTokenizer."""
  if spec == "bytes":
    return ByteTokenizer()
  path = Path(spec) if isinstance(spec, str) and spec else None
  if path is not None and path.is_dir() and (path / "tokenizer.json").is_file():
    path = path / "tokenizer.json"
  if path is None or not path.is_file():
    raise GrowlmError(
        f"tokenizer {spec!r} not found (accepted: 'bytes', a path to a Hugging Face "
        "tokenizer.json, or a folder holding one)")
  return HFTokenizer(str(path))


# -------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents of one split of one source, with a manifest to compare machines by."""
  name: str
  split: str
  documents: list[str]
  n_bytes: int
  manifest: dict


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _hash_fraction(doc_id: str) -> int:
  """A document's place in [0, 10000), stable across machines and Python runs."""
  return int(_sha(doc_id.encode("utf-8"))[:8], 16) % 10000


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
  found.sort(key=lambda item: (_sha(item[0].encode("utf-8")), item[0]))
  return found


def _stdlib_documents(split: str, eval_fraction: float,
                      max_bytes: int) -> list[tuple[str, str]]:
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
    matches = [p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p)]
    if not matches:
      raise GrowlmError(f"file source pattern {pattern!r} matches no file")
    paths.update(matches)
  return sorted(paths)


def _file_documents(patterns: str, split: str, eval_fraction: float) -> list[tuple[str, str]]:
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


def truncate_utf8(text: str, max_bytes: int) -> str:
  """The longest prefix of `text` whose UTF-8 form fits in `max_bytes`."""
  data = text.encode("utf-8")
  if len(data) <= max_bytes:
    return text
  return data[:max_bytes].decode("utf-8", errors="ignore")


def _cap_documents(docs: list[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
  """Documents in order until `max_bytes`; the one crossing the cap is cut to fit."""
  out, total = [], 0
  for doc_id, text in docs:
    if total >= max_bytes:
      break
    text = truncate_utf8(text, max_bytes - total)
    total += len(text.encode("utf-8"))
    out.append((doc_id, text))
  return out


def load_documents(spec: str, split: str, *, eval_fraction: float = 0.1, max_bytes: int = 0,
                   data_dir: str | None = None) -> list[tuple[str, str]]:
  """(document id, text) pairs of one split of a source; may be empty. See `load_corpus`."""
  if split not in SPLITS:
    raise GrowlmError(f"split {split!r} not accepted (accepted: {', '.join(SPLITS)})")
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
      docs = _cap_documents(docs, max_bytes)
  elif spec.startswith("tfds:"):
    from growlm import tfds_text  # pylint: disable=g-import-not-at-top
    docs = tfds_text.tfds_documents(spec[len("tfds:"):], split, data_dir, max_bytes)
  else:
    raise GrowlmError(f"source spec {spec!r} not understood (accepted: {SOURCE_FORMS})")
  # An empty document would only add a stray end-of-text token.
  return [(doc_id, text) for doc_id, text in docs if text]


def documents_sha256(docs: Sequence[tuple[str, str]]) -> tuple[str, int]:
  """(sha256 over the ordered (id, content sha256) list, total UTF-8 bytes)."""
  digest = hashlib.sha256()
  n_bytes = 0
  for doc_id, text in docs:
    data = text.encode("utf-8")
    n_bytes += len(data)
    digest.update(f"{doc_id}\t{_sha(data)}\n".encode("utf-8"))
  return digest.hexdigest(), n_bytes


def load_corpus(spec: str, split: str, *, eval_fraction: float = 0.1, max_bytes: int = 0,
                data_dir: str | None = None) -> Corpus:
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
  sha, n_bytes = documents_sha256(docs)
  manifest = {
      "spec": spec, "split": split, "n_documents": len(docs), "n_bytes": n_bytes,
      "sha256": sha, "python_version": platform.python_version(),
      "eval_fraction": eval_fraction, "max_bytes": max_bytes,
  }
  return Corpus(name=spec, split=split, documents=[text for _, text in docs],
                n_bytes=n_bytes, manifest=manifest)


# ------------------------------------------------------------ token streams


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One int32 token array: each document preceded by the tokenizer's eot_id."""
  tokens: np.ndarray
  n_bytes: int
  manifest: dict
  bytes_per_token: float


def tokenize_corpus(corpus: Corpus, tokenizer: Any) -> TokenStream:
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
      "n_tokens": int(tokens_N.size), "tokens_sha256": _sha(tokens_N.tobytes()),
  })
  return TokenStream(tokens=tokens_N, n_bytes=corpus.n_bytes, manifest=manifest,
                     bytes_per_token=corpus.n_bytes / tokens_N.size)


def num_windows(stream: TokenStream, seq_len: int) -> int:
  """How many packed windows of `seq_len` targets the stream holds."""
  return max(0, (int(stream.tokens.size) - 1) // seq_len)


def _check_layout(stream: TokenStream, seq_len: int, global_batch: int,
                  process_index: int, process_count: int) -> int:
  """Validates the batch layout; returns the number of windows."""
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
  n_windows = num_windows(stream, seq_len)
  if n_windows < global_batch:
    raise GrowlmError(
        f"dataset {stream.manifest.get('spec')!r} split {stream.manifest.get('split')!r} has "
        f"{stream.tokens.size} tokens: too few for one batch of {global_batch} x {seq_len} "
        f"(needs {global_batch * seq_len + 1})")
  return n_windows


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

  def epoch(self) -> float:
    """Epochs completed so far, fractional."""
    return self.step * self.global_batch / self.n_windows

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
    if not isinstance(state, dict):
      raise GrowlmError(f"data iterator state must be a dict, got {type(state).__name__}")
    mine = self.get_state()
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
    self.step = int(step)


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
