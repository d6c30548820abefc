"""Data: text sources -> documents -> tokens -> packed, resumable batches.

  tokenizers.py  bytes and Hugging Face tokenizer.json tokenizers
  documents.py   (id, text) document lists: split names, byte caps, hashes, the Corpus
  tfds_text.py   reading tensorflow-datasets text datasets (array_record)
  sources.py     the corpus sources (stdlib, file:, tfds:), their splits and manifests
  prepare.py     writing any source as a tensorflow-datasets text dataset
  pipeline.py    token streams, the packed resumable iterator and eval batches

Each module imports only modules listed above it, never this package's names.
Callers import the package, not its modules: `data.load_corpus(spec, "train")`,
`data.tokenize_corpus(corpus, data.make_tokenizer("bytes"))`,
`data.DataIterator(stream, seq_len, global_batch, seed)`.
"""

from growlm.data.documents import SPLITS, Corpus, documents_sha256, truncate_utf8
from growlm.data.pipeline import DataIterator, TokenStream, eval_batches, num_windows
from growlm.data.pipeline import tokenize_corpus
from growlm.data.prepare import prepare_text_dataset
from growlm.data.sources import SOURCE_FORMS, load_corpus, load_documents, resolve_file_patterns
from growlm.data.sources import stdlib_files
from growlm.data.tokenizers import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "SOURCE_FORMS", "SPLITS", "ByteTokenizer", "Corpus", "DataIterator", "HFTokenizer",
    "TokenStream", "documents_sha256", "eval_batches", "load_corpus", "load_documents",
    "make_tokenizer", "num_windows", "prepare_text_dataset", "resolve_file_patterns",
    "stdlib_files", "tokenize_corpus", "truncate_utf8",
]
