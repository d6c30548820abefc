"""benchmarks/data.py in --quick mode: the JSON's fields and its arithmetic.

No timing thresholds: only that times and rates are positive and finite, and that every derived
figure (MB/s, tokens/s, the loader's token counts, the headroom ratios) follows from the measured
ones. The run is a subprocess: prepare spawns worker processes, which re-import the script.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_benchmark, positive_finite

SCRIPT = REPO / "benchmarks" / "data.py"
REF = 427_000


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  """One --quick run, with a stand-in throughput.json of two trainer rows."""
  tmp = tmp_path_factory.mktemp("data_bench")
  throughput = tmp / "throughput.json"
  throughput.write_text(json.dumps({
      "settings": {"preset": "cpu"}, "machine": {"device_kind": "cpu"},
      "rows": [{"style": "gpt2", "batch": 16, "seq_len": 256, "train": {"tokens_per_sec": 5092.0}},
               {"style": "llama", "batch": 16, "seq_len": 256,
                "train": {"tokens_per_sec": 5120.0}}]}))
  out = tmp / "data.json"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--throughput_json",
       str(throughput)], cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "headroom" in proc.stdout and f"wrote {out}" in proc.stdout
  return json.loads(out.read_text())


def test_prepare_figures(result):
  """Per tokenizer: MB, MB/s, tokens/s from the manifest counts and the measured seconds."""
  r = result
  assert r["quick"] is True and r["settings"]["source_mb"] == 0.4
  assert set(r["prepare"]) == {"bytes", "bpe"}
  for p in r["prepare"].values():
    for key in ("seconds", "source_mb", "mb_per_sec", "tokens_per_sec", "bytes_per_token"):
      assert positive_finite(p[key]), (key, p)
    assert p["source_mb"] == pytest.approx(p["source_bytes"] / 1e6, rel=1e-12)
    assert p["source_bytes"] <= 0.4e6   # the byte cap of --quick
    assert p["mb_per_sec"] == pytest.approx(p["source_mb"] / p["seconds"], rel=1e-12)
    assert p["tokens"] == p["train_tokens"] + p["eval_tokens"]
    assert p["tokens_per_sec"] == pytest.approx(p["tokens"] / p["seconds"], rel=1e-12)
    assert p["bytes_per_token"] == pytest.approx(p["source_bytes"] / p["tokens"], rel=1e-12)
    cpus = r["machine"]["os_cpu_count"] or 1
    assert p["workers_used"] == min(r["settings"]["workers"] or cpus, p["n_parts"])
    assert p["dtype"] == "uint16" and p["shard_bytes"] > 0
  # The same source both times; the bytes tokenizer gives one token per byte plus one eot each.
  b, bpe = r["prepare"]["bytes"], r["prepare"]["bpe"]
  assert b["source_bytes"] == bpe["source_bytes"] and b["documents"] == bpe["documents"]
  assert b["tokens"] == b["source_bytes"] + b["documents"]
  assert bpe["tokens"] < b["tokens"]
  tok = r["tokenizers"]["bpe"]
  assert tok["vocab_size"] == tok["vocab_size_asked"] == r["settings"]["bpe_vocab"]
  assert 0 < tok["trained_on_bytes"] <= r["settings"]["bpe_kb"] * 1000
  assert "BPE" in tok["kind"] and len(tok["sha256"]) == 64


def test_loader_figures(result):
  """tokens = batches x local rows x seq_len; tokens/s = tokens / seconds, for every loader."""
  s, ld = result["settings"], result["loader"]
  expected_rows = {"one_host": s["batch"], "host_of_n": s["batch"] // s["hosts"],
                   "in_memory": s["batch"]}
  for name, rows in expected_rows.items():
    part = ld[name]
    assert part["local_batch"] == rows and part["seq_len"] == s["seq_len"]
    assert part["batches"] == s["batches"] and part["warmup_batches"] == s["warmup"]
    assert part["tokens"] == part["batches"] * rows * s["seq_len"]
    assert positive_finite(part["seconds"]) and positive_finite(part["tokens_per_sec"])
    assert part["tokens_per_sec"] == pytest.approx(part["tokens"] / part["seconds"], rel=1e-12)
    assert part["batches_per_sec"] == pytest.approx(part["batches"] / part["seconds"], rel=1e-12)
  assert ld["host_of_n"]["process_count"] == s["hosts"]
  assert ld["in_memory"]["stream_tokens"] == result["prepare"]["bpe"]["train_tokens"]


def test_headroom(result):
  """The headroom ratios against the GPU reference and this machine's trainer rows."""
  r = result
  one = r["loader"]["one_host"]["tokens_per_sec"]
  per_host = r["loader"]["host_of_n"]["tokens_per_sec"]
  assert r["gpu_reference_tokens_per_sec"] == REF
  assert r["loader_tokens_per_sec"] == one
  assert r["loader_tokens_per_sec_per_host_of_n"] == per_host
  assert r["headroom"] == pytest.approx(one / REF, rel=1e-12)
  assert r["headroom_8_gpus"] == pytest.approx(one / (8 * REF), rel=1e-12)
  assert r["headroom_host_of_n"] == pytest.approx(per_host / REF, rel=1e-12)
  assert "CPU estimate" in r["note"] and "H100" in r["gpu_reference"]
  trainer = r["this_machine_trainer"]
  assert [row["style"] for row in trainer["rows"]] == ["gpt2", "llama"]
  for row in trainer["rows"]:
    assert row["headroom"] == pytest.approx(one / row["train_tokens_per_sec"], rel=1e-12)
  for key in ("process_max_rss_bytes", "largest_worker_max_rss_bytes", "wall_seconds"):
    assert positive_finite(r[key]), key
  for key in ("created", "command", "machine", "source_description", "mb_definition"):
    assert key in r, key


def test_missing_throughput_json_and_bad_args(tmp_path):
  """A missing throughput.json is skipped (None); a batch the hosts do not divide is refused."""
  mod = load_benchmark("data")
  assert mod.trainer_headroom(str(tmp_path / "absent.json"), 1.0) is None
  (tmp_path / "bad.json").write_text("{not json")
  assert mod.trainer_headroom(str(tmp_path / "bad.json"), 1.0) is None
  with pytest.raises(SystemExit):
    mod.parse_args(["--batch", "12", "--hosts", "8"])
  args = mod.parse_args(["--quick"])
  assert (args.seq_len, args.batch, args.source_mb) == (128, 8, 0.4)
  assert mod.parse_args([]).out == os.path.join("runs", "bench", "data.json")


def test_make_bench_runs_it():
  """`make bench` runs the data benchmark after the other three (throughput with its profile
  by part, the attention kernels, growth), then the GPU step's and growth's traffic (after
  `make gpu-aot`)."""
  lines = (REPO / "Makefile").read_text().split("bench: install gpu-aot\n")[1].splitlines()
  assert lines[:5] == ["\t$(PY) benchmarks/throughput.py --profile runs/bench/profile",
                       "\t$(PY) benchmarks/attention.py", "\t$(PY) benchmarks/growth.py",
                       "\t$(PY) benchmarks/data.py",
                       "\t$(PY) benchmarks/gpu_traffic.py --growth"]
