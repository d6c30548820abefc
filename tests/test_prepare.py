"""growlm.prepare: sources -> token shards, equal to the in-memory tokens, resumable, strict."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, byte_level_bpe
from growlm import data
from growlm.data import shards
from growlm.errors import GrowlmError

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
          "rho sigma tau upsilon phi chi psi omega café naïve 東京 ∑ 🙂").split()


def _text(seed: int, n_lines: int) -> str:
  rng = np.random.default_rng(seed)
  return "".join(" ".join(rng.choice(_WORDS, size=rng.integers(1, 12))) + "\n"
                 for _ in range(n_lines))


def _files(root: Path, n: int, n_lines: int = 40) -> str:
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    (root / f"doc{i:03d}.txt").write_text(_text(i, n_lines), encoding="utf-8")
  return f"file:{root}/*.txt"


def _prepared_tokens(out, split):
  part = data.PreparedSplit(str(out), split, data.read_manifest(str(out))).open()
  return part.read(0, part.n_tokens)


def _in_memory(source, split, tokenizer, **kw):
  return data.tokenize_corpus(data.load_corpus(source, split, **kw), tokenizer).tokens


def _shard_bytes(out):
  return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())
          if p.suffix in (".array_record", ".json")}


def test_prepared_splits_hold_the_in_memory_tokens(tmp_path):
  """Each split's shards, concatenated, are exactly tokenize_corpus(load_corpus(...)), for a
  source cut into many parts and tokenized by two worker processes."""
  source = _files(tmp_path / "src", 12)
  out = tmp_path / "out"
  manifest = data.prepare_tokens(source, "bytes", str(out), eval_fraction=0.1, part_mb=0.002,
                                 workers=2, progress=False)
  assert manifest["n_parts"] >= 6 and manifest["dtype"] == "uint16"
  tok = data.make_tokenizer("bytes")
  for split in ("train", "eval"):
    expected = _in_memory(source, split, tok, eval_fraction=0.1)
    got = _prepared_tokens(out, split)
    np.testing.assert_array_equal(got, expected)
    info = manifest["splits"][split]
    assert info["n_tokens"] == expected.size and info["n_documents"] == 12
    assert info["n_bytes"] == int((expected < 256).sum())
    assert all(s["n_records"] == -(-s["n_tokens"] // shards.RECORD_TOKENS) for s in info["shards"])
  # Rerunning is a no-op that returns the same manifest and rewrites nothing.
  before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
  assert data.prepare_tokens(source, "bytes", str(out), eval_fraction=0.1, part_mb=0.002,
                             workers=2, progress=False) == manifest
  assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_stdlib_prepared_equals_in_memory_and_splits_are_disjoint(tmp_path):
  out = tmp_path / "std"
  manifest = data.prepare_tokens("stdlib", "bytes", str(out), part_mb=4, workers=2,
                                 progress=False)
  tok = data.make_tokenizer("bytes")
  for split in ("train", "eval"):
    np.testing.assert_array_equal(_prepared_tokens(out, split),
                                  _in_memory("stdlib", split, tok, eval_fraction=0.05))
  train_ids = {d for d, _ in data.load_documents("stdlib", "train", eval_fraction=0.05)}
  eval_ids = {d for d, _ in data.load_documents("stdlib", "eval", eval_fraction=0.05)}
  assert eval_ids and not train_ids & eval_ids
  assert manifest["splits"]["eval"]["n_documents"] == len(eval_ids)


def test_jsonl_and_parquet_rows_with_a_text_field(tmp_path):
  """JSONL and Parquet give the same rows, split by row hash; the field is configurable."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  texts = [_text(i, 3) for i in range(200)]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n"
                                            for i, t in enumerate(texts)), encoding="utf-8")
  pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
  tok = data.make_tokenizer("bytes")
  for kind, ext in (("jsonl", "jsonl"), ("parquet", "parquet")):
    source = f"{kind}:{tmp_path}/a.{ext}"
    out = tmp_path / kind
    manifest = data.prepare_tokens(source, "bytes", str(out), text_field="body", progress=False,
                                   eval_fraction=0.2, workers=1)
    n_eval = manifest["splits"]["eval"]["n_documents"]
    assert manifest["splits"]["train"]["n_documents"] + n_eval == 200 and 20 < n_eval < 60
    docs = {split: [t for _, t in data.load_documents(source, split, eval_fraction=0.2,
                                                      text_field="body")]
            for split in ("train", "eval")}
    assert sorted(docs["train"] + docs["eval"]) == sorted(texts)
    for split in ("train", "eval"):
      stream = data.tokenize_corpus(data.Corpus(source, split, docs[split], 0, {}), tok).tokens
      np.testing.assert_array_equal(_prepared_tokens(out, split), stream)


def test_the_trainer_reads_the_field_that_data_text_field_names(tmp_path):
  from conftest import run_config  # pylint: disable=g-import-not-at-top
  from growlm.config.typed import resolve  # pylint: disable=g-import-not-at-top
  from growlm.train import trainer  # pylint: disable=g-import-not-at-top
  texts = [_text(i, 3) for i in range(200)]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts),
                                    encoding="utf-8")
  source, tok = f"jsonl:{tmp_path}/a.jsonl", data.make_tokenizer("bytes")
  fields = {"data.train": source, "data.eval_fraction": 0.2, "data.max_bytes": 0}
  _, evals, _ = trainer.load_data(resolve(run_config(**fields, **{"data.text_field": "body"})),
                                  tok)
  docs = [t for _, t in data.load_documents(source, "eval", eval_fraction=0.2, text_field="body")]
  want = data.tokenize_corpus(data.Corpus(source, "eval", docs, 0, {}), tok).tokens
  got = np.asarray(evals["heldout"].tokens)
  assert 0 < len(got) <= len(want) and (got == want[:len(got)]).all()
  with pytest.raises(GrowlmError, match="no field 'text' .*it has: body.*data.text_field"):
    trainer.load_data(resolve(run_config(**fields)), tok)


def test_a_missing_text_field_is_one_line_and_writes_nothing(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"content": "x"}\n')
  out = tmp_path / "out"
  with pytest.raises(GrowlmError, match="no field 'text' .*it has: content.*--text_field"):
    data.prepare_tokens(f"jsonl:{tmp_path}/a.jsonl", "bytes", str(out), progress=False)
  assert not out.exists()


@pytest.mark.parametrize("bad, says", [(b"caf\xe9 au lait\n" * 50, "not UTF-8"),
                                       (b"", "no train text")])
def test_bad_text_found_while_tokenizing_leaves_out_as_it_was(tmp_path, bad, says):
  """The error comes from the tokenizing workers, after the plan is written: a fresh --out is
  removed again (an empty one kept empty), so the same command runs once the file is fixed."""
  for name, made in (("new", False), ("empty", True)):
    src, out = tmp_path / f"{name}.txt", tmp_path / f"out-{name}"
    src.write_bytes(bad)
    if made:
      out.mkdir()
    with pytest.raises(GrowlmError, match=says):
      data.prepare_tokens(f"file:{src}", "bytes", str(out), progress=False, workers=1)
    assert (os.listdir(out) == []) if made else not out.exists()
    src.write_text("fixed text\n" * 50)
    manifest = data.prepare_tokens(f"file:{src}", "bytes", str(out), progress=False, workers=1)
    assert manifest["splits"]["train"]["n_tokens"] > 0


def test_tfds_source_with_a_text_field(tmp_path):
  """A tfds dataset (array_record, read without TensorFlow) prepares to its own splits."""
  source = _files(tmp_path / "src", 5)
  data_dir = str(tmp_path / "tfds")
  spec = data.prepare_text_dataset(source, data_dir, name="growlm_prep_test")
  out = tmp_path / "out"
  data.prepare_tokens(spec, "bytes", str(out), data_dir=data_dir, progress=False, workers=1)
  tok = data.make_tokenizer("bytes")
  for split in ("train", "eval"):
    np.testing.assert_array_equal(_prepared_tokens(out, split),
                                  _in_memory(spec, split, tok, data_dir=data_dir))
  with pytest.raises(GrowlmError, match="no feature 'body'"):
    data.prepare_tokens(spec, "bytes", str(tmp_path / "o2"), data_dir=data_dir,
                        text_field="body", progress=False)
  with pytest.raises(GrowlmError, match="without ':SPLIT'"):
    data.prepare_tokens(spec + ":train", "bytes", str(tmp_path / "o3"), data_dir=data_dir,
                        progress=False)


def test_hf_tokenizer_shards_decode_back_and_large_vocab_is_uint32(tmp_path):
  import tokenizers
  source = _files(tmp_path / "src", 4)
  texts = [p.read_text(encoding="utf-8") for p in sorted((tmp_path / "src").iterdir())]
  byte_level_bpe(texts, 400).save(str(tmp_path / "tokenizer.json"))
  out = tmp_path / "bpe"
  manifest = data.prepare_tokens(source, str(tmp_path / "tokenizer.json"), str(out),
                                 eval_fraction=0.0, progress=False, workers=1)
  tok = data.make_tokenizer(str(tmp_path / "tokenizer.json"))
  assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == tok.vocab_size
  assert manifest["tokenizer"]["sha256"] == tok.sha256
  ids = _prepared_tokens(out, "train")
  docs = np.split(ids, np.flatnonzero(ids == tok.eot_id))[1:]
  assert [tok.decode(d[1:]) for d in docs] == [t for t in texts]
  # A word-level vocabulary of 70,000 entries does not fit uint16.
  vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]"] + _WORDS +
                                      [f"w{i}" for i in range(70_000 - 2 - len(_WORDS))])}
  wl = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  wl.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  wl.save(str(tmp_path / "wl.json"))
  (tmp_path / "w.txt").write_text("w69000 alpha w5\n")
  manifest = data.prepare_tokens(f"file:{tmp_path}/w.txt", str(tmp_path / "wl.json"),
                                 str(tmp_path / "wl"), eval_fraction=0.0, progress=False)
  assert manifest["dtype"] == "uint32"
  assert _prepared_tokens(tmp_path / "wl", "train").tolist() == [0, vocab["w69000"], 2 + 0,
                                                                 vocab["w5"]]


def test_an_interrupted_prepare_resumes_to_identical_shards(tmp_path):
  """SIGKILL during a prepare, then the same command: shards and manifest byte-identical to an
  uninterrupted prepare, and the killed one left no manifest and no part that looks complete
  without its shards."""
  source = _files(tmp_path / "src", 60, n_lines=400)
  texts = [p.read_text(encoding="utf-8") for p in sorted((tmp_path / "src").iterdir())[:8]]
  byte_level_bpe(texts, 600).save(str(tmp_path / "tok.json"))
  args = [f"--source={source}", f"--tokenizer={tmp_path / 'tok.json'}", "--part_mb=0.02",
          "--workers=1", "--noprogress"]
  cmd = [sys.executable, "-m", "growlm.prepare"]
  full = tmp_path / "full"
  subprocess.run(cmd + args + [f"--out={full}"], check=True, cwd=REPO, capture_output=True)
  n_parts = json.loads((full / shards.MANIFEST).read_text())["n_parts"]
  assert n_parts >= 30
  cut = tmp_path / "cut"
  proc = subprocess.Popen(cmd + args + [f"--out={cut}"], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and len(list(cut.glob("part-*.json"))) < 3:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(list(cut.glob("part-*.json")))
  assert 3 <= done < n_parts and not (cut / shards.MANIFEST).exists()
  # A torn shard of the next part, as a crash inside the writer leaves it.
  (cut / (shards.shard_name("train", done, n_parts) + ".tmp")).write_bytes(b"torn")
  with pytest.raises(GrowlmError, match="unfinished prepare: rerun"):
    data.read_manifest(str(cut))
  out = subprocess.run(cmd + args + [f"--out={cut}"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert _shard_bytes(cut) == _shard_bytes(full)
  assert not list(cut.glob("*.tmp"))


def test_a_part_whose_shard_was_damaged_is_redone(tmp_path):
  source = _files(tmp_path / "src", 6)
  kw = dict(part_mb=0.004, workers=1, progress=False)
  data.prepare_tokens(source, "bytes", str(tmp_path / "ref"), **kw)
  out = tmp_path / "out"
  data.prepare_tokens(source, "bytes", str(out), **kw)
  (out / shards.MANIFEST).unlink()   # as if stopped just before the manifest
  shard = sorted(out.glob("train-*.array_record"))[1]
  shard.write_bytes(shard.read_bytes()[:1000])
  data.prepare_tokens(source, "bytes", str(out), **kw)
  assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")


def test_out_directories_that_are_not_this_prepare_are_refused(tmp_path):
  source = _files(tmp_path / "src", 3)
  out = tmp_path / "out"
  data.prepare_tokens(source, "bytes", str(out), progress=False, workers=1)
  with pytest.raises(GrowlmError, match="holds a prepare of other data .*eval_fraction"):
    data.prepare_tokens(source, "bytes", str(out), eval_fraction=0.2, progress=False)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(GrowlmError, match="non-empty directory that holds no prepare"):
    data.prepare_tokens(source, "bytes", str(tmp_path / "other"), progress=False)
  (tmp_path / "afile").write_text("x")
  with pytest.raises(GrowlmError, match="is a file"):
    data.prepare_tokens(source, "bytes", str(tmp_path / "afile"), progress=False)
  assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    ([], "--source=SOURCE and --out=DIR are both required"),
    (["--source=nope", "--out=OUT"], "source spec 'nope' not understood"),
    (["--source=file:/nonexistent/*.txt", "--out=OUT"], "matches no file"),
    (["--source=stdlib", "--out=OUT", "--tokenizer=/no/such.json"], "tokenizer '/no/such.json' "
     "not found"),
    (["--source=stdlib", "--out=OUT", "--eval_fraction=1.5"], "eval_fraction=1.5 not accepted"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
  args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
  out = subprocess.run([sys.executable, "-m", "growlm.prepare", *args], cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("growlm: error: ") and message in lines[0]
  assert not (tmp_path / "out").exists()


def test_sentencepiece_tokenizer_round_trips_and_is_found_in_a_folder(tmp_path):
  import sentencepiece as spm
  corpus = tmp_path / "sp.txt"
  corpus.write_text(_text(0, 400), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
      model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
      add_dummy_prefix=False, remove_extra_whitespaces=False, pad_id=3,
      minloglevel=2)
  tok = data.make_tokenizer(str(tmp_path))   # a folder holding tokenizer.model
  assert isinstance(tok, data.SentencePieceTokenizer) and tok.vocab_size == 400
  assert tok.eot_id == 2 and tok.pad_id == 3
  assert tok.sha256 == hashlib.sha256((tmp_path / "tokenizer.model").read_bytes()).hexdigest()
  text = "sigma café 東京 🙂 unseen ✓ words\n  two  spaces"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 400
  assert tok.decode(ids) == text
  assert tok.decode(np.concatenate([[tok.eot_id], ids, [tok.pad_id]])) == text
  assert [x.tolist() for x in tok.encode_batch([text, "pi"])] == [ids.tolist(),
                                                                  tok.encode("pi").tolist()]
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "noeos"),
                                 vocab_size=50, eos_id=-1, minloglevel=2)
  with pytest.raises(GrowlmError, match="no end-of-sentence piece"):
    data.make_tokenizer(str(tmp_path / "noeos.model"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(GrowlmError, match="not a readable SentencePiece model"):
    data.make_tokenizer(str(tmp_path / "bad.model"))


def test_tfds_data_dir_on_gs(gcs, tmp_path, monkeypatch):
  """A tfds data_dir on gs:// is read through the local mirror: the same tokens as locally."""
  from growlm import fs  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GROWLM_CACHE", str(tmp_path / "cache"))
  source = _files(tmp_path / "src", 3)
  local_dir = str(tmp_path / "tfds")
  spec = data.prepare_text_dataset(source, local_dir, name="growlm_prep_gs")
  remote = gcs.bucket() + "/tfds"
  fs.copy_tree(local_dir, remote)
  got = data.prepare_tokens(spec, "bytes", str(tmp_path / "a"), data_dir=remote, progress=False,
                            workers=1)
  want = data.prepare_tokens(spec, "bytes", str(tmp_path / "b"), data_dir=local_dir,
                             progress=False, workers=1)
  assert got["splits"] == want["splits"] and got["splits"]["train"]["n_tokens"] > 0
  with pytest.raises(GrowlmError, match="is not prepared under data_dir='gs://"):
    data.prepare_tokens("tfds:nothing_here", "bytes", str(tmp_path / "c"), data_dir=remote,
                        progress=False)
