"""Streaming from prepared shards: the batches, process shares, resume, bad shards, the trainer,
and resident memory that stays flat over a corpus larger than it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_config
from growlm import commands
from growlm import data
from growlm.data import shards
from growlm.errors import GrowlmError
from growlm.rundir import read_metrics

BYTES = data.make_tokenizer("bytes")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Ten small text files prepared in several parts, and their whole train token stream."""
  root = tmp_path_factory.mktemp("stream")
  rng = np.random.default_rng(0)
  for i in range(10):
    words = rng.choice(["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"],
                       size=3000)
    (root / f"f{i}.txt").write_text("".join(" ".join(words[k:k + 10]) + "\n"
                                            for k in range(0, len(words), 10)))
  out = root / "prep"
  data.prepare_tokens(f"file:{root}/*.txt", "bytes", str(out), part_mb=0.04, workers=1,
                      progress=False)
  part = data.open_split(f"prepared:{out}", "train", BYTES)
  return f"prepared:{out}", part.read(0, part.n_tokens)


def _iterator(spec, **kw):
  args = dict(seq_len=32, global_batch=8, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return data.PreparedIterator(data.open_split(spec, "train", BYTES), args.pop("seq_len"),
                               args.pop("global_batch"), args.pop("seed"), **args)


def test_rows_are_the_packed_windows_and_an_epoch_covers_each_once(prepared):
  spec, tokens = prepared
  it = _iterator(spec)
  assert len(it.part.shards) >= 3
  L, W = 32, (tokens.size - 1) // 32
  seen = []
  for step in range(W // 8):
    batch = next(it)
    windows = it.windows_at(step)
    for row, w in enumerate(windows):
      np.testing.assert_array_equal(batch["inputs"][row], tokens[w * L:w * L + L])
      np.testing.assert_array_equal(batch["targets"][row], tokens[w * L + 1:w * L + L + 1])
    seen.extend(windows.tolist())
  assert len(set(seen)) == len(seen) == (W // 8) * 8
  assert seen != sorted(seen)   # shuffled
  # The next epoch is another order; another seed is another order too.
  assert it.windows_at(W // 8 + 1).tolist() != it.windows_at(1).tolist()
  assert _iterator(spec, seed=1).windows_at(0).tolist() != it.windows_at(0).tolist()


def test_two_processes_read_disjoint_rows_that_make_the_global_batch(prepared):
  spec, _ = prepared
  whole, p0, p1 = (_iterator(spec), _iterator(spec, process_index=0, process_count=2),
                   _iterator(spec, process_index=1, process_count=2))
  for step in range(6):
    g, a, b = next(whole), next(p0), next(p1)
    assert a["inputs"].shape == (4, 32)
    np.testing.assert_array_equal(np.concatenate([a["inputs"], b["inputs"]]), g["inputs"])
    assert not set(p0.windows_at(step).tolist()) & set(p1.windows_at(step).tolist())


def test_resume_from_state_sees_the_uninterrupted_batches(prepared):
  spec, _ = prepared
  it = _iterator(spec)
  ref = [next(it)["inputs"] for _ in range(7)]
  first = _iterator(spec)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))   # as a checkpoint holds it
  assert state["grain"] == {"next_index": 3} or state["grain"].get("next_index") == 3
  again = _iterator(spec)
  again.set_state(state)
  for k in range(3, 7):
    np.testing.assert_array_equal(next(again)["inputs"], ref[k])
  with pytest.raises(GrowlmError, match="seed=0 differs from this run's 1"):
    _iterator(spec, seed=1).set_state(state)
  with pytest.raises(GrowlmError, match="no grain state"):
    _iterator(spec).set_state({k: v for k, v in state.items() if k != "grain"})


def _copy(spec, tmp_path):
  import shutil
  dst = tmp_path / "copy"
  shutil.copytree(spec[len("prepared:"):], dst)
  return dst


def test_bad_prepared_data_is_one_clear_error(prepared, tmp_path):
  spec, _ = prepared
  d = _copy(spec, tmp_path)
  manifest = json.loads((d / shards.MANIFEST).read_text())
  shard = d / manifest["splits"]["train"]["shards"][1]["file"]
  shard.write_bytes(os.urandom(manifest["splits"]["train"]["shards"][1]["file_bytes"]))
  with pytest.raises(GrowlmError, match="a shard cannot be read"):   # unreadable, same size
    data.open_split(f"prepared:{d}", "train", BYTES)
  other = d / manifest["splits"]["train"]["shards"][0]["file"]
  shard.write_bytes(other.read_bytes())   # another shard in its place
  with pytest.raises(GrowlmError, match="not match the manifest|records, the manifest says"):
    data.open_split(f"prepared:{d}", "train", BYTES)
  shard.write_bytes(b"")   # empty
  with pytest.raises(GrowlmError, match="has 0 bytes, its manifest says"):
    data.open_split(f"prepared:{d}", "train", BYTES)
  shard.unlink()
  with pytest.raises(GrowlmError, match="is missing"):
    data.open_split(f"prepared:{d}", "train", BYTES)
  (d / shards.MANIFEST).unlink()
  with pytest.raises(GrowlmError, match="unfinished prepare: rerun"):
    data.open_split(f"prepared:{d}", "train", BYTES)
  with pytest.raises(GrowlmError, match="has no manifest.json; accepted: a directory written"):
    data.open_split(f"prepared:{tmp_path / 'nothing'}", "train", BYTES)


def test_a_tokenizer_other_than_the_prepared_one_is_refused(prepared, tmp_path):
  from conftest import byte_level_bpe
  spec, _ = prepared
  byte_level_bpe(["some text to learn from"] * 4, 300).save(str(tmp_path / "t.json"))
  with pytest.raises(GrowlmError, match="was tokenized with 'bytes' .*not data.tokenizer="):
    data.open_split(spec, "train", data.make_tokenizer(str(tmp_path / "t.json")))


def _losses(workdir):
  return [(r["step"], r["train_loss"]) for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train_loss" in r]


def test_prepare_train_resume_equals_uninterrupted(prepared, tmp_path):
  """The trainer on prepared data: stopped at step 5 and relaunched, it logs what an
  uninterrupted run logs, and its checkpoints hold grain's iterator state."""
  spec, _ = prepared
  kw = {"data.train": spec, "data.max_bytes": 0, "log.every_steps": 1, "data.seq_len": 32}
  commands.train(run_config(**kw), str(tmp_path / "full"))
  commands.train(run_config(**kw, **{"train.stop_at": 5}), str(tmp_path / "resumed"))
  commands.train(run_config(**kw), str(tmp_path / "resumed"))
  full, resumed = _losses(str(tmp_path / "full")), _losses(str(tmp_path / "resumed"))
  assert [s for s, _ in resumed] == list(range(1, len(full) + 1)) and len(full) >= 10
  assert resumed == full
  manifest = json.loads((tmp_path / "full" / "data_manifest.json").read_text())
  assert manifest["train"]["spec"] == spec and manifest["eval/heldout"]["split"] == "eval"
  last = max(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir()
             if p.name.isdigit())
  state = json.loads((tmp_path / "full" / "checkpoints" / str(last) / "data" / "metadata")
                     .read_text())
  assert state["step"] == last and state["grain"] == {"next_index": last}


def test_prepared_train_refuses_a_byte_cap(prepared, tmp_path):
  spec, _ = prepared
  with pytest.raises(GrowlmError, match="data.max_bytes applies to in-memory sources"):
    commands.train(run_config(**{"data.train": spec, "data.max_bytes": 1000}), str(tmp_path))
  assert not (tmp_path / "config.json").exists()


_RSS_SCRIPT = r"""
import json, sys, numpy as np
from growlm import data
def rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096
spec = sys.argv[1]
import grain  # its import (jax with it) is ~160 MB of code, the same for any corpus
marks = {0: rss()}
it = data.PreparedIterator(data.open_split(spec, "train", data.make_tokenizer("bytes")),
                           1024, 16, 0)
for step in range(1, 1201):
  next(it)
  if step in (100, 400, 800, 1200):
    marks[step] = rss()
print(json.dumps(marks))
"""


@pytest.mark.slow
def test_loader_resident_memory_stays_flat_over_a_large_corpus(tmp_path):
  """150 M prepared tokens (300 MB as uint16 ids): reading 1,200 random batches of 16 x 1024
  keeps the resident set flat after warm-up, and the loader's share of it (above the process's
  resident set once grain is imported, before the data is opened) far below the corpus size."""
  root = tmp_path / "big"
  root.mkdir()
  rng = np.random.default_rng(0)
  for i in range(10):
    (root / f"f{i}.txt").write_bytes(rng.integers(32, 127, size=15_000_000, dtype=np.uint8)
                                     .tobytes())
  out = tmp_path / "prep"
  manifest = data.prepare_tokens(f"file:{root}/*.txt", "bytes", str(out), workers=2,
                                 eval_fraction=0.01, progress=False)
  corpus_bytes = manifest["splits"]["train"]["n_tokens"] * 2
  assert corpus_bytes > 290e6
  res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, f"prepared:{out}"], cwd=REPO,
                       capture_output=True, text=True, check=True)
  marks = {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
  print("resident bytes by step:", marks, "corpus bytes:", corpus_bytes)
  assert marks[1200] - marks[100] < 24 << 20     # flat: under 24 MiB of growth after warm-up
  assert marks[1200] - marks[0] < corpus_bytes / 10   # the loader holds under a tenth of it
