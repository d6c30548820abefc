"""Tokenizers: text <-> int32 token ids, with an end-of-text id to separate documents.

  "bytes"                    ByteTokenizer: UTF-8 bytes are ids 0..255, 256 ends a
                             document, 257 pads; needs nothing installed.
  a tokenizer.json path      HFTokenizer: a local Hugging Face tokenizer (or a folder
                             holding tokenizer.json), through the `tokenizers` library.
  a .model path              SentencePieceTokenizer: a SentencePiece model (or a folder
                             holding tokenizer.model), through `sentencepiece`.

All have `name`, `vocab_size`, `eot_id`, `pad_id`, `sha256` (of the tokenizer file: what
prepared data and a run are checked against), `encode`, `encode_batch` and `decode`;
`make_tokenizer(spec)` picks one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from growlm.errors import GrowlmError, first_line

_EOT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_PAD_TOKENS = ("<pad>",)
# Chunks cut just after a newline: byte-level BPE pre-tokenizers split at
# newlines anyway, so chunked encoding equals whole-text encoding there.
_ENCODE_CHUNK_CHARS = 1 << 16


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 ends a document, 257 pads."""

  name = "bytes"
  eot_id = 256
  pad_id = 257
  vocab_size = 258
  sha256 = hashlib.sha256(b"growlm bytes tokenizer: ids 0..255 bytes, 256 eot, 257 pad").hexdigest()

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
      raise GrowlmError(f"tokenizer {str(path)!r} is not a readable Hugging Face tokenizer.json "
                        f"({first_line(e)})") from e
    self.vocab_size = self._tok.get_vocab_size()
    self.sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    eot = self._find(_EOT_TOKENS)
    if eot is None:
      raise GrowlmError(
          f"tokenizer {str(path)!r} has no end-of-text token (accepted: {', '.join(_EOT_TOKENS)})")
    self.eot_id = eot
    pad = self._find(_PAD_TOKENS)
    self.pad_id = eot if pad is None else pad

  def _find(self, candidates: Sequence[str]) -> int | None:
    """The id of the first of `candidates` in the vocabulary, or None."""
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


class SentencePieceTokenizer:
  """A local SentencePiece `.model` file, through the `sentencepiece` library."""

  def __init__(self, path: str):
    """Loads `path`; the model must define an end-of-sentence piece (its eos id)."""
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self.name = str(path)
    data = Path(path).read_bytes()
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # The C++ error text can span lines.
      raise GrowlmError(f"tokenizer {str(path)!r} is not a readable SentencePiece model "
                        f"({first_line(e)})") from e
    self.sha256 = hashlib.sha256(data).hexdigest()
    self.vocab_size = int(self._sp.get_piece_size())
    if self._sp.eos_id() < 0:
      raise GrowlmError(f"tokenizer {str(path)!r} has no end-of-sentence piece (eos_id = -1); "
                        "accepted: a SentencePiece model trained with an eos piece")
    self.eot_id = int(self._sp.eos_id())
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eot_id

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32, no bos/eos added."""
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes each text; same as `encode` on each."""
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids back to text, control pieces (bos, eos, pad) dropped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode([i for i in ids if not self._sp.is_control(i)])


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


def train_byte_level_bpe(texts: Sequence[str], vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` as GPT-2's tokenizer.json is
  built (special tokens <pad> and <|endoftext|>, the 256 byte symbols always in); `.save(path)`
  writes a tokenizer.json that `make_tokenizer` reads. Its vocabulary may come out smaller than
  `vocab_size` when the texts offer fewer merges."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<|endoftext|>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


def make_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer | SentencePieceTokenizer:
  """'bytes' -> ByteTokenizer; a tokenizer.json path (or a folder holding one) -> HFTokenizer;
  a SentencePiece .model path (or a folder holding tokenizer.model) -> SentencePieceTokenizer."""
  if spec == "bytes":
    return ByteTokenizer()
  path = Path(spec) if isinstance(spec, str) and spec else None
  if path is not None and path.is_dir():
    for name in ("tokenizer.json", "tokenizer.model"):
      if (path / name).is_file():
        path = path / name
        break
  if path is None or not path.is_file():
    raise GrowlmError(
        f"tokenizer {spec!r} not found (accepted: 'bytes', a path to a Hugging Face "
        "tokenizer.json or a SentencePiece .model, or a folder holding one)")
  if path.suffix == ".model":
    return SentencePieceTokenizer(str(path))
  return HFTokenizer(str(path))
