"""benchmarks/throughput.py in --quick mode: the JSON's fields and its arithmetic.

No timing thresholds: only that rates are positive and finite, and that every derived number
(tokens/sec, achieved FLOP/s, MFU) follows from the measured ones as documented.
"""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from conftest import load_benchmark, positive_finite, user_env

from growlm.errors import EXIT_USER_ERROR
from growlm.model import flops
from growlm.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput.py"
PART_FIELDS = ("flops_per_token", "compile_seconds", "step_seconds", "median_step_seconds",
               "tokens_per_sec", "achieved_flops_per_sec", "achieved_gflops", "matmul_seconds",
               "matmul_flops_per_sec", "matmul_gflops", "mfu", "tokens_per_sec_best",
               "achieved_flops_per_sec_best", "matmul_flops_per_sec_best", "mfu_best",
               "spec_peak_flops_per_sec", "mfu_spec", "xla_memory")


def _check_result(result: dict, styles: list[str]) -> None:
  """Everything the JSON promises, recomputed from its own measured numbers."""
  for key in ("matmul", "matmul_gflops", "matmul_flops_per_sec", "rows", "machine", "settings",
              "device_memory", "flops_convention", "mfu_definition", "command", "wall_seconds"):
    assert key in result, key
  assert result["quick"] is True
  steps = result["settings"]["steps"]
  mm = result["matmul"]
  flops_per_matmul = 2.0 * mm["n"] ** 3
  assert mm["flops_per_matmul"] == flops_per_matmul

  assert [r["style"] for r in result["rows"]] == styles
  assert result["machine"]["devices_used"] == 1
  all_matmul_s = []
  for row in result["rows"]:
    assert len(row["device_ids"]) == 1
    assert math.isfinite(row["final_train_loss"])
    cfg = ModelConfig.from_dict(row["model"])
    L = row["seq_len"]
    assert row["tokens_per_step"] == row["batch"] * L
    # PaLM convention from growlm.flops; eval (forward only) is a third of training.
    assert row["train"]["flops_per_token"] == pytest.approx(flops.flops_per_token(cfg, L))
    assert row["eval"]["flops_per_token"] == pytest.approx(flops.flops_per_token(cfg, L) / 3)
    for part in ("train", "eval"):
      r = row[part]
      for key in PART_FIELDS:
        assert key in r, (part, key)
      assert len(r["step_seconds"]) == steps and len(r["matmul_seconds"]) == steps
      assert all(positive_finite(t) for t in r["step_seconds"] + r["matmul_seconds"])
      all_matmul_s += r["matmul_seconds"]
      assert positive_finite(r["compile_seconds"])
      assert positive_finite(r["tokens_per_sec"])
      assert positive_finite(r["matmul_gflops"])
      # Each derived number follows from the raw timings.
      median_step = statistics.median(r["step_seconds"])
      assert r["median_step_seconds"] == pytest.approx(median_step, rel=1e-12)
      assert r["tokens_per_sec"] == pytest.approx(row["tokens_per_step"] / median_step, rel=1e-12)
      achieved = r["tokens_per_sec"] * r["flops_per_token"]
      assert r["achieved_flops_per_sec"] == pytest.approx(achieved, rel=1e-12)
      assert r["achieved_gflops"] == pytest.approx(achieved / 1e9, rel=1e-12)
      matmul_rate = flops_per_matmul / statistics.median(r["matmul_seconds"])
      assert r["matmul_flops_per_sec"] == pytest.approx(matmul_rate, rel=1e-12)
      assert r["matmul_gflops"] == pytest.approx(matmul_rate / 1e9, rel=1e-12)
      # MFU is a ratio to the matmul rate measured in the same run, nothing else.
      assert 0 < r["mfu"]
      assert r["mfu"] == pytest.approx(achieved / matmul_rate, rel=1e-12)
      assert r["mfu"] == pytest.approx(r["achieved_flops_per_sec"] / r["matmul_flops_per_sec"],
                                       rel=1e-12)
      best = (row["tokens_per_step"] / min(r["step_seconds"]) * r["flops_per_token"]) / (
          flops_per_matmul / min(r["matmul_seconds"]))
      assert 0 < r["mfu_best"] == pytest.approx(best, rel=1e-12)

      # On CPU no spec peak exists: the spec MFU is absent, never invented.
      if r["spec_peak_flops_per_sec"] is None:
        assert r["mfu_spec"] is None
      else:
        assert r["mfu_spec"] == pytest.approx(achieved / r["spec_peak_flops_per_sec"])
    _check_torch(row, steps, flops_per_matmul)

  # The run's reference rate: positive, finite, the median of every timed matmul.
  assert mm["reps"] == len(all_matmul_s) == 2 * steps * len(styles)
  assert positive_finite(result["matmul_gflops"])
  assert positive_finite(result["matmul_flops_per_sec"])
  assert result["matmul_flops_per_sec"] == pytest.approx(
      flops_per_matmul / statistics.median(all_matmul_s), rel=1e-12)
  assert result["matmul_gflops"] == pytest.approx(result["matmul_flops_per_sec"] / 1e9,
                                                  rel=1e-12)


def _check_torch(row: dict, steps: int, flops_per_matmul: float) -> None:
  """The PyTorch reference: run for gpt2 rows (same steps, ratio from its own timings),
  skipped with a reason for the others."""
  t = row["torch"]
  if row["style"] != "gpt2":
    assert "gpt2 style only" in t["skipped"]
    return
  assert len(t["step_seconds"]) == steps
  assert all(positive_finite(x) for x in t["step_seconds"])
  median = statistics.median(t["step_seconds"])
  assert t["tokens_per_sec"] == pytest.approx(row["tokens_per_step"] / median, rel=1e-12)
  assert row["growlm_over_torch"] == pytest.approx(
      row["train"]["tokens_per_sec"] / t["tokens_per_sec"], rel=1e-12)
  assert row["growlm_over_torch_best"] == pytest.approx(
      min(t["step_seconds"]) / min(row["train"]["step_seconds"]), rel=1e-12)
  # torch's own matmul, timed after each timed reference step: its rate, the reference's MFU
  # against it, and the split growlm / reference = MFU ratio x jax's rate / torch's.
  assert len(t["matmul_seconds"]) == steps
  assert all(positive_finite(x) for x in t["matmul_seconds"])
  rate = t["matmul_flops_per_sec"]
  assert rate == pytest.approx(flops_per_matmul / statistics.median(t["matmul_seconds"]),
                               rel=1e-12)
  assert t["mfu"] == pytest.approx(t["tokens_per_sec"] * row["train"]["flops_per_token"] / rate,
                                   rel=1e-12)
  assert row["torch_matmul_over_jax"] == pytest.approx(
      rate / row["train"]["matmul_flops_per_sec"], rel=1e-12)
  assert row["growlm_over_torch"] == pytest.approx(
      row["train"]["mfu"] / t["mfu"] / row["torch_matmul_over_jax"], rel=1e-9)
  # Same weights and batch: the two start from the same loss (float32, eager reference).
  assert math.isfinite(t["final_loss"])
  assert t["first_loss"] == pytest.approx(row["first_train_loss"], rel=1e-5)


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459),
    ("TPU v5p", 459), ("TPU v6 lite", 918), ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_spec_peaks(kind, tflops):
  peak = load_benchmark("throughput").spec_peak_flops(kind)
  assert peak == (None if tflops is None else tflops * 1e12)


def test_quick_in_process_uses_one_device(tmp_path):
  """Called as a function in this 8-fake-device process: still measures on one device."""
  out = tmp_path / "bench.json"
  result = load_benchmark("throughput").main(["--quick", "--styles", "gpt2", "--out", str(out)])
  assert result["machine"]["devices_visible"] == jax.device_count()
  _check_result(result, ["gpt2"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_quick_keeps_the_flags_given_with_it():
  """--quick sets what the command line leaves unset; a flag given beside it wins, and is
  checked as it would be without --quick."""
  throughput = load_benchmark("throughput")
  args = throughput.parse_args(["--quick", "--steps", "3", "--styles", "gpt2"])
  assert (args.steps, args.batch, args.size, args.warmup) == (3, 2, "nano", 1)
  with pytest.raises(SystemExit) as e:
    throughput.parse_args(["--quick", "--steps", "-3"])
  assert e.value.code == 2
  growth = load_benchmark("growth")
  assert (growth.parse_args(["--quick", "--runs", "5"]).runs,
          growth.parse_args(["--quick"]).runs) == (5, 2)


@pytest.mark.parametrize("out, says", [
    ("a_dir", "is a directory; accepted: the path of the JSON file"),
    ("gs://bucket/r.json", "the benchmarks write local files"),
    ("a_file/sub/r.json", "a_file is not a directory"),
])
def test_an_out_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, out, says):
  common = load_benchmark("common")
  (tmp_path / "a_dir").mkdir()
  (tmp_path / "a_file").write_text("x")
  ran = []
  path = out if out.startswith("gs:") else str(tmp_path / out)
  with pytest.raises(SystemExit) as e:
    common.cli("x.py", ["--out", path], lambda argv: type("A", (), {"out": path})(),
               lambda args, command: ran.append(1), str)
  assert e.value.code == EXIT_USER_ERROR and not ran
  err = capsys.readouterr().err.strip()
  assert err.startswith("growlm: error: --out") and says in err and "\n" not in err, err
  assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file"]   # nothing written beside them


def test_an_out_that_fails_after_the_run_is_one_line_and_leaves_no_tmp(tmp_path, capsys):
  """The result cannot be written (here its directory became a file while the run went on):
  one line, and no half-written .tmp beside --out."""
  common = load_benchmark("common")
  path = str(tmp_path / "sub" / "r.json")
  with pytest.raises(SystemExit) as e:
    common.cli("x.py", ["--out", path], lambda argv: type("A", (), {"out": path})(),
               lambda args, command: (tmp_path / "sub").write_text("x") or {"a": 1}, str)
  assert e.value.code == EXIT_USER_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith(f"growlm: error: --out={path}: cannot write the result"), err
  assert sorted(os.listdir(tmp_path)) == ["sub"] and (tmp_path / "sub").read_text() == "x"


def test_float16_on_a_cpu_is_one_line(capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    load_benchmark("throughput").main(["--quick", "--dtype", "float16", "--torch", "off",
                                       "--out", str(tmp_path / "t.json")])
  assert e.value.code == EXIT_USER_ERROR
  err = capsys.readouterr().err.strip()
  assert err.startswith("growlm: error: --dtype='float16' does not run on a CPU"), err
  assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_quick_command_line(tmp_path):
  """`throughput.py --quick --out PATH` as `make bench` runs it, both styles, one real device."""
  out = tmp_path / "sub" / "bench.json"
  env = user_env()   # not the suite's 8 fake CPU devices: the machine as it is
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "MFU" in proc.stdout and str(out) in proc.stdout
  result = json.loads(out.read_text())
  assert result["machine"]["devices_visible"] == 1
  _check_result(result, ["gpt2", "llama"])


def test_attention_kernels_quick(tmp_path, capsys):
  """benchmarks/attention.py --quick: every implementation that runs on a CPU, timed with the
  ratio to SDPA from its own figures; the accelerator kernels named as not run; a bad name
  refused with one error line."""
  bench = load_benchmark("attention")
  result = bench.main(["--quick", "--out", str(tmp_path / "a.json")])
  assert result["auto"] == "blocked"
  assert set(result["rows"]) == {"xla", "naive", "blocked"}
  assert set(result["skipped"]) == {"cudnn", "splash"}
  assert result["shape"]["seq_len"] == 64 and result["shape"]["batch"] == 2
  ref = result["sdpa"]
  for row in result["rows"].values():
    assert positive_finite(row["forward_ms"]) and positive_finite(row["forward_backward_ms"])
    if "skipped" not in ref:
      assert row["over_sdpa"] == pytest.approx(row["forward_backward_ms"]
                                               / ref["forward_backward_ms"], rel=1e-12)
  assert json.loads((tmp_path / "a.json").read_text()) == json.loads(json.dumps(result))
  with pytest.raises(SystemExit) as e:
    bench.main(["--quick", "--impls", "blocked,fused", "--out", str(tmp_path / "b.json")])
  assert e.value.code == EXIT_USER_ERROR
  assert "growlm: error: --impls names ['fused']" in capsys.readouterr().err
  assert not (tmp_path / "b.json").exists()


def test_logits_precision_quick(tmp_path):
  """benchmarks/logits_precision.py --quick: bf16 logits move the loss and gradient (so the
  setting took effect) by less than bf16 compute already does against float32, and short runs
  from the same weights (float32, bf16 with each logits dtype) stay close to each other."""
  result = load_benchmark("logits_precision").main(["--quick", "--out", str(tmp_path / "p.json")])
  diff, err = result["loss_abs_diff"], result["grad_rel_err"]
  assert all(positive_finite(v) for v in list(diff.values()) + list(err.values()))
  assert err["bf16 logits vs f32 logits"] < err["bf16 f32 logits vs f32"] < 0.05
  assert diff["bf16 bf16 logits vs f32"] < 1e-2
  after = result["training"]["eval_loss_after"]
  assert list(after) == ["f32", "bf16, f32 logits", "bf16, bf16 logits"]
  assert all(positive_finite(v) for v in after.values())
  assert abs(after["bf16, f32 logits"] - after["bf16, bf16 logits"]) < 1e-2
  gaps = result["training"]["max_train_loss_gap"]
  assert set(gaps) == {"bf16 logits vs f32 logits", "bf16 vs f32"}
  assert all(0 <= v < 1e-2 for v in gaps.values()), gaps
  assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(result))


_IMPORT_EACH = """
import importlib.util, os, sys
root, decoy = sys.argv[1], sys.argv[2]
for path in sys.argv[3:]:
  # as a fresh interpreter would start the script: its folder first, the decoy on the path
  # (where an installed growlm would be), no growlm imported, and the root not on the path
  siblings = {f[:-3] for f in os.listdir(os.path.dirname(path)) if f.endswith(".py")}
  for name in [m for m in sys.modules
               if m == "growlm" or m.startswith("growlm.") or m in siblings]:
    del sys.modules[name]
  sys.path[:] = [os.path.dirname(path), decoy] + [p for p in sys.path if p not in
                                                  (root, "", os.path.dirname(path), decoy)]
  spec = importlib.util.spec_from_file_location("bench_" + os.path.basename(path)[:-3], path)
  spec.loader.exec_module(importlib.util.module_from_spec(spec))
  print(os.path.basename(path), sys.modules["growlm"].__file__)
"""


def test_every_benchmark_imports_the_growlm_beside_it(tmp_path):
  """Each script that imports growlm takes it from its own checkout, ahead of any other growlm
  on the path (an editable install of another checkout): here a decoy placed where an installed
  one would be, which fails on import. Each script is imported in one process, in turn, as a
  fresh interpreter would start it. Before benchmarks/common.py put the root first, every one
  of them imported whichever growlm the environment had."""
  decoy = tmp_path / "decoy"
  (decoy / "growlm").mkdir(parents=True)
  (decoy / "growlm" / "__init__.py").write_text("raise ImportError('the decoy growlm')\n")
  scripts = sorted(str(p) for p in (REPO / "benchmarks").glob("*.py")
                   if "from growlm" in p.read_text() and "__main__" in p.read_text())
  assert {"growth.py", "throughput.py", "data.py", "knobs.py"} <= {Path(p).name for p in scripts}
  proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, str(REPO), str(decoy), *scripts],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = dict(line.split() for line in proc.stdout.splitlines())
  assert set(got) == {Path(p).name for p in scripts}
  assert all(f == str(REPO / "growlm" / "__init__.py") for f in got.values()), got


def test_compile_for_refuses_a_bad_knob_before_any_row(tmp_path, capsys):
  """A value the config refuses is bad input (one line, exit 2, no JSON), where a step that does
  not fit the chip is a row of the table (tests/test_aot.py)."""
  bench = load_benchmark("compile_for")
  for flags, says in ((["--remats", "everything"], "remat='everything'; accepted"),
                      (["--styles", "gpt3"], "model style 'gpt3' unknown")):
    with pytest.raises(SystemExit) as e:
      bench.main(["--topologies", "v5e:2x2", "--n_layers", "1", *flags,
                  "--out", str(tmp_path / "c.json")])
    out, err = capsys.readouterr()
    assert e.value.code == EXIT_USER_ERROR and not out
    assert err.startswith("growlm: error: ") and says in err and err.count("\n") == 1, err
  assert not (tmp_path / "c.json").exists()
