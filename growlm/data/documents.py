"""Documents: lists of (document id, text) pairs, and the Corpus that carries one split.

Every source (sources.py, tfds_text.py) yields documents in a fixed order; the
helpers here cap them to a byte budget and hash them, so two machines can check
that they read the same text. Pure functions: no file, network or tfds access.

Splits: "train" and "eval" never share text; "all" is everything (for
eval-only datasets). How each source splits is described in sources.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

SPLITS = ("train", "eval", "all")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents of one split of one source, with a manifest to compare machines by."""
  name: str
  split: str
  documents: list[str]
  n_bytes: int
  manifest: dict


def _sha(data: bytes) -> str:
  """Hex sha256 of `data`."""
  return hashlib.sha256(data).hexdigest()


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


def documents_sha256(docs: Sequence[tuple[str, str]]) -> tuple[str, int]:
  """(sha256 over the ordered (id, content sha256) list, total UTF-8 bytes)."""
  digest = hashlib.sha256()
  n_bytes = 0
  for doc_id, text in docs:
    data = text.encode("utf-8")
    n_bytes += len(data)
    digest.update(f"{doc_id}\t{_sha(data)}\n".encode("utf-8"))
  return digest.hexdigest(), n_bytes
