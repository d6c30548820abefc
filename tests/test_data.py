"""Tests for growlm.data: tokenizers, sources, splits, tokens, packing, resume, tfds."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from growlm import data
from growlm.data import tokenizers as data_tokenizers
from growlm.errors import GrowlmError

from conftest import byte_level_bpe

DATASETS = Path(__file__).parents[1] / ".." / "shared" / "datasets"
SHAKESPEARE = DATASETS / "tinyshakespeare" / "input.txt"


def _raises_one_line(fn, *args, match=None, **kwargs):
  with pytest.raises(GrowlmError, match=match) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert message and "\n" not in message, message
  return message


def _synthetic_stream(n_tokens, sha="synthetic-sha"):
  """tokens[i] = i, so a row's first input tells which window it came from."""
  manifest = {"spec": "synthetic", "split": "train", "tokens_sha256": sha}
  return data.TokenStream(tokens=np.arange(n_tokens, dtype=np.int32), n_bytes=n_tokens,
                          manifest=manifest, bytes_per_token=1.0)


@pytest.fixture(scope="module")
def stdlib_splits():
  return {split: data.load_corpus("stdlib", split) for split in data.SPLITS}


@pytest.fixture(scope="module")
def hf_tokenizer_path(tmp_path_factory):
  pytest.importorskip("tokenizers")
  lines = ["the quick brown fox jumps over the lazy dog", "to be or not to be",
           "naïve café, déjà vu"] * 20
  tok = byte_level_bpe(lines, vocab_size=400)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return path


# ----------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_non_ascii():
  tok = data.ByteTokenizer()
  text = "héllo, wörld ✓ 日本\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist()[:3] == [104, 195, 169]  # "h", then "é" as two UTF-8 bytes.
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  # Special ids are dropped, broken UTF-8 becomes U+FFFD rather than an error.
  assert tok.decode([tok.eot_id, 104, tok.pad_id, 105]) == "hi"
  assert tok.decode([195]) == "\ufffd"
  assert (tok.vocab_size, tok.eot_id, tok.pad_id, tok.name) == (258, 256, 257, "bytes")


def test_hf_tokenizer_round_trip_and_special_ids(hf_tokenizer_path):
  tok = data.make_tokenizer(str(hf_tokenizer_path))
  assert isinstance(tok, data.HFTokenizer)
  assert tok.eot_id == 1 and tok.pad_id == 0  # Ids as given to the trainer.
  assert tok.vocab_size == tok._tok.get_vocab_size() > 258  # Alphabet, specials, some merges.
  text = "the lazy fox, naïve café\nto be or not"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and 0 < len(ids) < len(text)
  assert tok.decode(ids) == text
  # A folder holding tokenizer.json is accepted too.
  assert data.make_tokenizer(str(hf_tokenizer_path.parent)).eot_id == 1


def test_hf_tokenizer_chunked_encoding_matches_whole(hf_tokenizer_path, monkeypatch):
  tok = data.make_tokenizer(str(hf_tokenizer_path))
  text = "to be or not to be\nthe quick brown fox\n" * 50
  whole = tok.encode(text)
  monkeypatch.setattr(data_tokenizers, "_ENCODE_CHUNK_CHARS", 64)
  assert len(data_tokenizers._newline_chunks(text, 64)) > 10
  np.testing.assert_array_equal(tok.encode(text), whole)


def test_hf_tokenizer_without_eot_is_rejected(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2},
                                                         unk_token="[UNK]"))
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  _raises_one_line(data.make_tokenizer, str(path), match="end-of-text")


def test_bad_tokenizer_specs(tmp_path):
  _raises_one_line(data.make_tokenizer, "byte", match="accepted")
  _raises_one_line(data.make_tokenizer, str(tmp_path / "missing.json"), match="accepted")
  broken = tmp_path / "broken.json"
  broken.write_text("{not json")
  _raises_one_line(data.make_tokenizer, str(broken), match="tokenizer.json")


# -------------------------------------------------------------------- sources


def test_stdlib_corpus_excludes_tests_and_is_hash_ordered():
  files = data.stdlib_files()
  assert len(files) > 300
  rels = [rel for rel, _ in files]
  assert not any(set(rel.split("/")[:-1]) & {"test", "tests", "idle_test", "site-packages"}
                 for rel in rels)
  assert "json/decoder.py" in rels
  assert rels != sorted(rels)  # Hash order, not alphabetical.


def test_stdlib_corpus_deterministic_and_splits_partition(stdlib_splits):
  train, evals, everything = stdlib_splits["train"], stdlib_splits["eval"], stdlib_splits["all"]
  assert everything.n_bytes > 5_000_000 and everything.manifest["n_documents"] > 300
  again = data.load_corpus("stdlib", "train")
  assert again.manifest["sha256"] == train.manifest["sha256"]
  assert train.manifest["python_version"].count(".") == 2
  assert set(train.documents).isdisjoint(evals.documents)
  assert sorted(train.documents + evals.documents) == sorted(everything.documents)
  assert train.n_bytes + evals.n_bytes == everything.n_bytes
  share = len(evals.documents) / len(everything.documents)
  assert 0.05 < share < 0.15, share
  assert len({train.manifest["sha256"], evals.manifest["sha256"],
              everything.manifest["sha256"]}) == 3


def test_stdlib_byte_cap(stdlib_splits):
  cap = 300_000
  capped = {split: data.load_corpus("stdlib", split, max_bytes=cap) for split in data.SPLITS}
  assert 0 < capped["all"].n_bytes <= cap
  assert capped["all"].n_bytes > 0.9 * cap  # Files that do not fit are skipped, not a stop.
  assert capped["train"].n_bytes + capped["eval"].n_bytes == capped["all"].n_bytes
  assert set(capped["all"].documents) <= set(stdlib_splits["all"].documents)
  assert capped["all"].manifest["n_bytes"] == capped["all"].n_bytes


def test_file_split_reconstructs_file_and_holds_out_tail(tmp_path):
  path = tmp_path / "doc.txt"
  text = "".join(f"line {i} ünïcode\n" for i in range(1000))
  path.write_text(text, encoding="utf-8")
  spec = f"file:{path}"
  train = data.load_corpus(spec, "train").documents
  evals = data.load_corpus(spec, "eval").documents
  assert len(train) == len(evals) == 1
  assert train[0] + evals[0] == text
  assert train[0].endswith("\n")  # The cut moved forward to a line start.
  assert evals[0].startswith("line ")
  assert abs(len(evals[0]) / len(text) - 0.1) < 0.002
  assert data.load_corpus(spec, "all").documents == [text]
  assert data.load_corpus(spec, "all", max_bytes=100).n_bytes == 100


def test_file_globs_sorted_and_deduplicated(tmp_path):
  for name in ("b.txt", "a.txt", "c.md"):
    (tmp_path / name).write_text(f"text of {name}\n")
  corpus = data.load_corpus(f"file:{tmp_path}/*.txt,{tmp_path}/a.txt", "all")
  assert corpus.documents == ["text of a.txt\n", "text of b.txt\n"]


def test_tinyshakespeare_last_tenth_is_eval():
  if not SHAKESPEARE.exists():
    pytest.skip(f"shared datasets not found at {SHAKESPEARE}")
  text = SHAKESPEARE.read_text(encoding="utf-8")
  spec = f"file:{SHAKESPEARE}"
  train = data.load_corpus(spec, "train")
  evals = data.load_corpus(spec, "eval")
  assert train.documents[0] + evals.documents[0] == text
  assert train.n_bytes + evals.n_bytes == 1_115_394
  assert 0.099 < len(evals.documents[0]) / len(text) < 0.101
  assert train.documents[0].endswith("\n")


def test_bad_source_specs(tmp_path):
  _raises_one_line(data.load_corpus, "wikipedia", "train", match="accepted")
  _raises_one_line(data.load_corpus, "file:", "train", match="empty pattern")
  _raises_one_line(data.load_corpus, f"file:{tmp_path}/none*.txt", "train", match="none")
  _raises_one_line(data.load_corpus, "stdlib", "test", match="accepted")
  _raises_one_line(data.load_corpus, "stdlib", "train", eval_fraction=1.0, match="eval_fraction")
  _raises_one_line(data.load_corpus, "stdlib", "eval", eval_fraction=0.0, match="empty")
  _raises_one_line(data.load_corpus, "stdlib", "train", max_bytes=-1, match="max_bytes")
  _raises_one_line(data.load_corpus, "tfds:bad name!", "train", match="tfds:NAME")
  _raises_one_line(data.load_corpus, "tfds:growlm_absent", "train", data_dir=str(tmp_path),
                   match="not prepared")


# ------------------------------------------------------------ tokens, packing


def test_tokenize_corpus_separates_documents(tmp_path):
  for name in ("a.txt", "b.txt"):
    (tmp_path / name).write_text("héllo\n")
  corpus = data.load_corpus(f"file:{tmp_path}/*.txt", "all")
  stream = data.tokenize_corpus(corpus, data.ByteTokenizer())
  assert stream.tokens.dtype == np.int32 and stream.tokens.ndim == 1
  assert stream.tokens.tolist() == [256, 104, 195, 169, 108, 108, 111, 10] * 2
  assert stream.n_bytes == 14
  assert stream.bytes_per_token == pytest.approx(14 / 16)
  assert stream.manifest["n_tokens"] == 16 and stream.manifest["tokenizer"] == "bytes"
  assert stream.manifest["sha256"] == corpus.manifest["sha256"]


def test_packing_targets_are_inputs_shifted(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("abcdefghij" * 30)
  stream = data.tokenize_corpus(data.load_corpus(f"file:{path}", "all"), data.ByteTokenizer())
  seq_len = 16
  it = data.DataIterator(stream, seq_len, 4, seed=0, shuffle=False)
  batch = next(it)
  assert batch["inputs"].shape == batch["targets"].shape == (4, seq_len)
  assert batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  # Unshuffled row j is window j: tokens[j*L : j*L + L + 1].
  for j in range(4):
    np.testing.assert_array_equal(batch["inputs"][j], stream.tokens[j * seq_len:(j + 1) * seq_len])
    assert batch["targets"][j, -1] == stream.tokens[(j + 1) * seq_len]
  assert it.n_windows == (301 - 1) // seq_len


def test_same_seed_same_batches_other_seed_differs():
  stream = _synthetic_stream(8 * 200 + 1)
  a, b = data.DataIterator(stream, 8, 4, seed=7), data.DataIterator(stream, 8, 4, seed=7)
  c = data.DataIterator(stream, 8, 4, seed=8)
  same = [np.array_equal(next(a)["inputs"], next(b)["inputs"]) for _ in range(5)]
  differ = [not np.array_equal(a.batch_at(s)["inputs"], c.batch_at(s)["inputs"])
            for s in range(5)]
  assert all(same) and all(differ)


def test_resume_from_state_matches_uninterrupted():
  stream = _synthetic_stream(8 * 37 + 1)  # 37 windows: batches of 6 cross epochs.
  reference = data.DataIterator(stream, 8, 6, seed=3)
  expected = [next(reference) for _ in range(20)]
  first = data.DataIterator(stream, 8, 6, seed=3)
  for _ in range(9):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"step": 9, "seed": 3, "seq_len": 8, "global_batch": 6,
                   "manifest_sha256": "synthetic-sha"}
  resumed = data.DataIterator(stream, 8, 6, seed=3)
  resumed.set_state(state)
  for step in range(9, 20):
    batch = next(resumed)
    np.testing.assert_array_equal(batch["inputs"], expected[step]["inputs"])
    np.testing.assert_array_equal(batch["targets"], expected[step]["targets"])
    np.testing.assert_array_equal(reference.batch_at(step)["inputs"], expected[step]["inputs"])


def test_each_epoch_covers_every_window_once():
  n_windows, seq_len, batch = 10, 4, 4
  stream = _synthetic_stream(n_windows * seq_len + 1)
  it = data.DataIterator(stream, seq_len, batch, seed=0)
  windows = np.concatenate([next(it)["inputs"][:, 0] // seq_len for _ in range(5)])  # 2 epochs.
  assert sorted(windows[:10]) == list(range(10))
  assert sorted(windows[10:]) == list(range(10))
  assert windows[:10].tolist() != windows[10:].tolist()  # A fresh order each epoch.
  assert windows[:10].tolist() != list(range(10))


def test_process_shares_concatenate_to_global_batch():
  stream = _synthetic_stream(8 * 23 + 1)
  full = data.DataIterator(stream, 8, 6, seed=1)
  shares = [data.DataIterator(stream, 8, 6, seed=1, process_index=p, process_count=2)
            for p in range(2)]
  for step in range(10):  # 23 windows: some batches straddle an epoch boundary.
    local = [next(s) for s in shares]
    assert local[0]["inputs"].shape == (3, 8)
    glob = next(full)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), glob[key])
  _raises_one_line(data.DataIterator, stream, 8, 6, 1, process_index=0, process_count=4,
                   match="divisible")
  _raises_one_line(data.DataIterator, stream, 8, 6, 1, process_index=2, process_count=2,
                   match="process_index")


def test_eval_batches_consecutive_limited_and_sharded():
  stream = _synthetic_stream(8 * 30 + 1)  # 30 windows -> at most 3 batches of 8.
  batches = data.eval_batches(stream, 8, 8, n_batches=100)
  assert len(batches) == 3
  assert len(data.eval_batches(stream, 8, 8, n_batches=2)) == 2
  firsts = np.concatenate([b["inputs"][:, 0] // 8 for b in batches])
  assert firsts.tolist() == list(range(24))
  again = data.eval_batches(stream, 8, 8, n_batches=100)
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, again))
  halves = [data.eval_batches(stream, 8, 8, 100, process_index=p, process_count=2)
            for p in range(2)]
  for k in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][k]["targets"], halves[1][k]["targets"]]), batches[k]["targets"])


def test_too_few_tokens_names_dataset_and_count():
  stream = _synthetic_stream(20)
  message = _raises_one_line(data.DataIterator, stream, 8, 4, 0, match="synthetic")
  assert "20 tokens" in message
  _raises_one_line(data.eval_batches, stream, 8, 4, 1, match="20 tokens")


def test_bad_states_are_rejected():
  stream = _synthetic_stream(8 * 40 + 1)
  it = data.DataIterator(stream, 8, 4, seed=0)
  good = it.get_state()
  for field, value in (("seed", 1), ("seq_len", 16), ("global_batch", 8),
                       ("manifest_sha256", "other")):
    _raises_one_line(it.set_state, {**good, field: value}, match=field)
  _raises_one_line(it.set_state, {**good, "step": -1}, match="step")
  _raises_one_line(it.set_state, {"step": 3}, match="seed")
  _raises_one_line(it.set_state, [good], match="dict")
  _raises_one_line(data.DataIterator, stream, 0, 4, 0, match="seq_len")
  _raises_one_line(data.DataIterator, stream, 8, 4, -1, match="seed")
  it.set_state({**good, "step": 5})
  assert it.step == 5


# ----------------------------------------------------------------------- tfds


def test_tfds_prepare_and_read_round_trip(tmp_path):
  text_path = tmp_path / "src.txt"
  text_path.write_text("".join(f"verse {i}: ça va\n" for i in range(500)), encoding="utf-8")
  source = f"file:{text_path}"
  data_dir = tmp_path / "tfds"
  spec = data.prepare_text_dataset(source, str(data_dir), name="growlm_test_text")
  assert spec == "tfds:growlm_test_text"
  for split in ("train", "eval"):
    got = data.load_corpus(spec, split, data_dir=str(data_dir))
    assert got.documents == data.load_corpus(source, split).documents
  assert data.load_corpus(spec, "all", data_dir=str(data_dir)).n_bytes == text_path.stat().st_size
  # Same source again: reused; another source under the same name: refused.
  assert data.prepare_text_dataset(source, str(data_dir), name="growlm_test_text") == spec
  _raises_one_line(data.prepare_text_dataset, source, str(data_dir),
                   name="growlm_test_text", eval_fraction=0.2, match="already holds")
  _raises_one_line(data.prepare_text_dataset, source, str(data_dir), name="Bad-Name",
                   match="snake_case")
  _raises_one_line(data.prepare_text_dataset, source, str(data_dir), name="mnist",
                   match="catalogue")
  _raises_one_line(data.load_corpus, spec + ":validation", "eval", data_dir=str(data_dir),
                   match="available: eval, train")


def test_tfds_stdlib_read_in_fresh_process(tmp_path):
  data_dir = str(tmp_path / "tfds")
  spec = data.prepare_text_dataset("stdlib", data_dir, max_bytes=400_000)
  expected = data.load_corpus("stdlib", "eval", max_bytes=400_000).documents
  # A process that imported only growlm.data, with no builder class defined.
  code = ("import hashlib, json, sys; from growlm import data; "
          f"c = data.load_corpus({spec!r}, 'eval', data_dir={data_dir!r}); "
          "print(json.dumps([len(c.documents), "
          "hashlib.sha256('\\0'.join(c.documents).encode()).hexdigest()]))")
  env = dict(os.environ)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                       env=env, timeout=120, check=True)
  n_docs, digest = json.loads(out.stdout.strip().splitlines()[-1])
  assert n_docs == len(expected) > 0
  assert digest == hashlib.sha256("\0".join(expected).encode()).hexdigest()


def test_site_packages_corpus_is_listed_deterministically_and_split_by_path():
  """The larger local corpus: every installed .py file once, hash-ordered, no __pycache__; its
  units are those files in that order, and train/eval split them by path hash."""
  files = data.site_packages_files()
  rels = [rel for rel, _ in files]
  assert len(rels) > 1000 and len(set(rels)) == len(rels)
  assert all(rel.endswith(".py") and "__pycache__" not in rel for rel in rels)
  assert any(rel.startswith("numpy/") for rel in rels) and any(rel.startswith("jax/") for rel in rels)
  assert rels == [rel for rel, _ in sorted(files, key=lambda f: hashlib.sha256(
      f[0].encode()).hexdigest())]
  assert data.site_packages_files() == files
  units = data.list_units("site-packages")
  assert [u.id for u in units] == rels
  assert sum(u.size for u in units) > 50e6
  from growlm.data import units as units_lib
  held_out = [u for u in units[:400] if units_lib.unit_documents(u, "eval", eval_fraction=0.05)]
  assert 5 <= len(held_out) <= 40
  for u in held_out:
    assert not units_lib.unit_documents(u, "train", eval_fraction=0.05)
