"""Run dirs on gs:// for real, against the local GCS emulator (tests/gcs_emulator.py): a run
trains, checkpoints, stops, resumes, is grown into other gs:// runs (in training and by the grow
command) and the sweep dir is analysed; nothing is written to the local disk."""

import json
import os

import pytest

from conftest import run_config
from growlm import commands, fs, rundir
from growlm.errors import GrowlmError
from growlm.experiments import analysis


def _train_steps(path):
  return [(r["step"], r["train_loss"]) for r in rundir.read_metrics(path) if "train_loss" in r]


@pytest.mark.slow
def test_gs_run_trains_resumes_grows_and_is_analysed(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # the old bug: a local "./gs:" folder; nothing local may appear
  sweep = gcs.bucket() + "/sweeps/s1"
  src = fs.join(sweep, "source")
  base = {"train.num_steps": 12, "checkpoint.every_steps": 6, "eval.every_steps": 6,
          "log.every_steps": 1}
  commands.train(run_config(**base), str(tmp_path / "local"))   # the same run, uninterrupted
  os.rename(tmp_path / "local", tmp_path.parent / f"{tmp_path.name}-local")
  commands.train(run_config(**base, **{"train.stop_at": 6}), src)
  assert rundir.checkpoint_steps(src) == [6]
  assert max(s for s, _ in _train_steps(rundir.metrics_path(src))) == 6
  commands.train(run_config(**base), src)   # resumes from its gs:// checkpoint
  assert rundir.checkpoint_steps(src) == [6, 12]
  got = _train_steps(rundir.metrics_path(src))
  ref = _train_steps(str(tmp_path.parent / f"{tmp_path.name}-local" / "metrics.jsonl"))
  assert got == ref and [s for s, _ in got] == list(range(1, 13))
  ckpt = fs.read_json_object(fs.join(src, "checkpoints", "12", "growlm_checksums.json"), "sums")
  assert "commit_success.txt" in ckpt["files"]   # checksummed after orbax's commit marker
  assert not fs.exists(fs.join(src, ".growlm-lock.json"))   # the lease was released

  grown = {"init.source": src, "model.d_model": 128, "model.n_layers": 4,
           "init.plan.width": "tile", "init.plan.depth": "identity", "train.num_steps": 6,
           "eval.every_steps": 6, "checkpoint.every_steps": 6}
  commands.train(run_config(**grown), fs.join(sweep, "grown"))
  report = fs.read_json_object(fs.join(sweep, "grown", "growth_report.json"), "report")
  assert report["source"] == src and report["max_abs_logit_diff"] < 1e-4
  commands.train(run_config(**{k: v for k, v in grown.items() if k != "init.source"}),
                 fs.join(sweep, "scratch"))

  out = fs.join(sweep, "grown_cmd")   # the grow command: built as OUT.partial, then moved
  commands.grow_into(run_config(**grown), src, out)
  assert rundir.checkpoint_steps(out) == [0] and not fs.exists(out + ".partial")
  with pytest.raises(GrowlmError, match="exists"):
    commands.grow_into(run_config(**grown), src, out)

  results = analysis.analyze(sweep)
  kinds = {name: r["kind"] for name, r in results["runs"].items()}
  assert kinds == {"source": "source", "grown": "grown", "scratch": "scratch",
                   "grown_cmd": "grown"}
  row = next(g for g in results["grown"] if g["run"] == "grown")
  assert row["baseline"] == "scratch"
  assert json.loads(fs.read_text(fs.join(sweep, "results.json")))["runs"].keys() == kinds.keys()
  assert fs.read_bytes(fs.join(sweep, "loss_curves.png"))[:4] == b"\x89PNG"
  assert "| grown |" in fs.read_text(fs.join(sweep, "results.md"))
  assert os.listdir(tmp_path) == []


def test_gs_workdir_in_a_missing_bucket_is_one_line(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(GrowlmError, match="--workdir gs://no-bucket-x1/run: bucket gs://no-bucket-x1 does "
                                        "not exist") as e:
    commands.train(run_config(), "gs://no-bucket-x1/run")
  assert "\n" not in str(e.value) and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_gs_data_prepare_train_and_hf_export(gcs, tmp_path, monkeypatch):
  """file: sources, prepared shards and HF directories on gs://: prepare reads a gs:// glob and
  uploads its shards (manifest last); training streams them through the local mirror; a run
  exports to a gs:// HF directory that imports to the same tensors as a local export."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from growlm import data  # pylint: disable=g-import-not-at-top
  from growlm.interop import hf as hf_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GROWLM_CACHE", str(tmp_path / "cache"))
  bucket = gcs.bucket()
  text = "".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps\n" for i in range(3000))
  for i in range(3):
    fs.write_text_atomic(fs.join(bucket, "corpus", f"part{i}.txt"), text[i::3])
  out = fs.join(bucket, "prepared")
  manifest = data.prepare_tokens(f"file:{bucket}/corpus/*.txt", "bytes", out, progress=False,
                                 workers=1)
  local = data.prepare_tokens(f"file:{bucket}/corpus/*.txt", "bytes", str(tmp_path / "p"),
                              progress=False, workers=1)
  assert manifest["splits"] == local["splits"]
  assert fs.listdir(out) == sorted(os.listdir(tmp_path / "p"))
  for name in os.listdir(tmp_path / "p"):   # the uploaded shards are the local prepare's bytes
    if name.endswith(".array_record"):
      assert fs.read_bytes(fs.join(out, name)) == (tmp_path / "p" / name).read_bytes()
  assert data.prepare_tokens(f"file:{bucket}/corpus/*.txt", "bytes", out, progress=False,
                             workers=1) == manifest   # a rerun finds it done
  run = fs.join(bucket, "runs", "prep")
  commands.train(run_config(**{"data.train": f"prepared:{out}", "data.max_bytes": 0,
                               "train.num_steps": 6, "checkpoint.every_steps": 6,
                               "eval.every_steps": 6}), run)
  assert rundir.checkpoint_steps(run) == [6]

  hf_gs, hf_local = fs.join(bucket, "hf"), str(tmp_path / "hf")
  commands.export_run(run, hf_gs)
  commands.export_run(run, hf_local)
  assert hf_lib.is_hf_dir(hf_gs) and sorted(fs.listdir(hf_gs)) == sorted(os.listdir(hf_local))
  a, b = hf_lib.import_hf(hf_gs), hf_lib.import_hf(hf_local)
  for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


@pytest.mark.slow
def test_gs_staged_run_stops_at_its_stage_resumes_and_matches_a_local_one(gcs, tmp_path,
                                                                          monkeypatch):
  """A run that grows inside itself (config.stages) on gs://: stopped at the stage step, it
  grows on relaunch, writes its stage report there and trains as the same run on local disk."""
  monkeypatch.chdir(tmp_path)
  base = {"train.num_steps": 8, "train.warmup_steps": 2, "checkpoint.every_steps": 4,
          "eval.every_steps": 4, "log.every_steps": 1}

  def staged(**more):
    c = run_config(**base, **more)
    c.stages = ({"step": 4, "model": {"d_model": 128, "n_heads": 4, "mlp_dim": 512,
                                      "n_layers": 4},
                 "plan": {"width": "tile", "depth": "identity"}, "optimizer": "grow"},)
    return c

  local = str(tmp_path.parent / f"{tmp_path.name}-local")
  commands.train(staged(), local)
  run = gcs.bucket() + "/staged"
  commands.train(staged(**{"train.stop_at": 4}), run)
  assert rundir.checkpoint_steps(run) == [4] and not fs.exists(fs.join(run, "growth_stage1.json"))
  commands.train(staged(), run)
  assert rundir.checkpoint_steps(run) == [4, 8]
  got, ref = (_train_steps(rundir.metrics_path(d)) for d in (run, local))
  assert got == ref and [s for s, _ in got] == list(range(1, 9))
  growths = [r for r in rundir.read_metrics(rundir.metrics_path(run))
             if r.get("event") == "growth"]
  assert len(growths) == 1 and growths[0]["step"] == 4
  report = fs.read_json_object(fs.join(run, "growth_stage1.json"), "report")
  assert report["stage"] == 1 and report["max_abs_logit_diff"] < 1e-4   # tile + identity: exact
  assert not fs.exists(fs.join(run, ".growlm-lock.json"))
  assert os.listdir(tmp_path) == []
