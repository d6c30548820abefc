"""Data: text sources -> documents -> tokens -> packed, resumable batches.

  tokenizers.py      bytes, Hugging Face tokenizer.json and SentencePiece tokenizers
  documents.py       (id, text) document lists: split names, byte caps, hashes, the Corpus
  tfds_text.py       reading tensorflow-datasets text datasets (array_record)
  units.py           a source spec -> ordered units (files, record ranges) and their documents
  sources.py         the corpus sources, their splits and manifests, read whole into memory
  tfds_prepare.py    writing any source as a tensorflow-datasets text dataset
  shards.py          token shards on disk: the writer, the manifest, random-access reads
  prepare_tokens.py  tokenizing a source once into token shards (`python -m growlm.prepare`)
  pipeline.py        in-memory token streams, the packed resumable iterator and eval batches
  stream.py          the streaming (grain) iterator over token shards; one way into either

Each module imports only modules listed above it, never this package's names.
Callers import the package, not its modules: `data.make_tokenizer("bytes")`,
`data.train_iterator(spec, tokenizer, ...)`, `data.token_stream(spec, "eval", tokenizer, ...)`,
`data.prepare_tokens(source, tokenizer, out)`.
"""

from growlm.data.documents import SPLITS, Corpus, documents_sha256, truncate_utf8
from growlm.data.pipeline import DataIterator, TokenStream, eval_batches, eval_tokens
from growlm.data.pipeline import num_windows
from growlm.data.pipeline import tokenize_corpus
from growlm.data.prepare_tokens import prepare_tokens
from growlm.data.shards import PreparedSplit, read_manifest
from growlm.data.sources import SOURCE_FORMS, load_corpus, load_documents
from growlm.data.stream import PreparedIterator, open_split, prepared_dir, token_stream
from growlm.data.stream import check_source, train_iterator
from growlm.data.tfds_prepare import prepare_text_dataset
from growlm.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
from growlm.data.tokenizers import make_tokenizer, train_byte_level_bpe
from growlm.data.units import list_units, resolve_file_patterns, site_packages_files
from growlm.data.units import stdlib_files

__all__ = [
    "SOURCE_FORMS", "SPLITS", "ByteTokenizer", "Corpus", "DataIterator", "HFTokenizer",
    "PreparedIterator", "PreparedSplit", "SentencePieceTokenizer", "TokenStream",
    "check_source", "documents_sha256", "eval_batches", "eval_tokens", "list_units", "load_corpus",
    "load_documents", "make_tokenizer", "num_windows", "open_split", "prepare_text_dataset",
    "prepare_tokens", "prepared_dir", "read_manifest", "resolve_file_patterns",
    "site_packages_files", "stdlib_files", "token_stream", "tokenize_corpus", "train_iterator",
    "train_byte_level_bpe", "truncate_utf8",
]
