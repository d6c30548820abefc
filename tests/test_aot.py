"""`--compile_for`: the train step compiled by XLA's TPU compiler for a slice this machine does
not have (growlm/train/aot.py). libtpu comes from `make install` (.venv/libtpu), so these run
in CI: they are the only place where the TPU path (splash attention's Pallas kernels, the remat
policies around them, the mesh's shardings) meets the real TPU compiler before a TPU does."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import pytest
from packaging.requirements import Requirement

from conftest import REPO, run_config
from growlm import commands
from growlm.config.typed import resolve
from growlm.errors import GrowlmError
from growlm.experiments import sweep
from growlm.train import aot

TOPOLOGY = "v5e:2x2"   # four v5e chips, one host


def _config(**overrides):
  """The nano runlocal model at seq_len 128 (splash's smallest block), batch 8, GQA."""
  fields = {"model.max_len": 128, "data.seq_len": 128, "data.batch_size": 8,
            "model.n_heads": 4, "model.n_kv_heads": 2, "mesh.data": 4}
  fields.update(overrides)
  return run_config(**fields)


def test_libtpu_pin_is_the_one_jax_asks_for():
  """constraints/cpu.txt pins the libtpu that the installed jax's [tpu] extra names (a jax bump
  without a libtpu bump would compile with a mismatched TPU compiler)."""
  pins = dict(line.split("==") for line in (REPO / "constraints" / "cpu.txt").read_text()
              .splitlines() if "==" in line and not line.startswith("#"))
  wanted = [Requirement(r) for r in importlib.metadata.requires("jax")
            if r.startswith("libtpu") and "tpu" in r.split(";")[-1]]
  assert len(wanted) == 1, wanted
  assert wanted[0].specifier.contains(pins["libtpu"]), (wanted[0], pins["libtpu"])
  assert aot.libtpu_path() is not None   # make install put it where growlm looks


def test_splash_compiles_for_a_tpu_slice_with_its_forward_kept():
  """auto attention is splash on the TPU mesh: the step holds its three Pallas kernels
  (forward, dq, dkv) under the default remat, and a fourth (the forward again) under remat=full,
  as the remat policies say (model.attention.KERNEL_FORWARDS)."""
  report = commands.compile_for(_config(), TOPOLOGY)
  assert (report["device_kind"], report["devices"], report["hosts"]) == ("TPU v5 lite", 4, 1)
  assert report["hbm_bytes_per_device"] == 16 << 30
  (stage,) = report["stages"]
  assert stage["attention"] == "splash" and stage["remat"] == "dots_no_batch"
  assert stage["scan_unroll"] == 1 < stage["n_layers"]   # auto keeps the loop on a TPU
  assert stage["pallas_kernels"] == 3
  assert stage["fits"] and 0 < stage["bytes_per_device"] < 1 << 30
  full = commands.compile_for(_config(**{"model.remat": "full"}), TOPOLOGY)["stages"][0]
  assert full["pallas_kernels"] == 4
  naive = commands.compile_for(_config(**{"model.attention": "naive"}), TOPOLOGY)["stages"][0]
  assert (naive["attention"], naive["pallas_kernels"]) == ("naive", 0)


def test_splash_named_explicitly_compiles(monkeypatch):
  """attention=splash, not auto: the model's init (8 tokens, which splash refuses) runs the
  naive kernel, which holds the same (no) parameters, so init works on a TPU too."""
  stage = commands.compile_for(_config(**{"model.attention": "splash"}), TOPOLOGY)["stages"][0]
  assert (stage["attention"], stage["pallas_kernels"]) == ("splash", 3)
  from growlm.model import attention, decoder, make_model_config
  monkeypatch.setattr(attention, "_platform", lambda: "tpu")
  cfg = make_model_config("nano", "llama", max_len=128)
  key = jax.random.key(3)
  got = decoder.init_params(cfg.replace(attention="splash"), key)
  want = decoder.init_params(cfg.replace(attention="xla"), key)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got, want))


def test_fsdp_and_tensor_meshes_split_the_state_on_the_slice():
  """The sharding rules hold on the TPU mesh: under fsdp=4 (and data 2 x tensor 2) each chip's
  arguments are a fraction of the replicated state's; splash runs inside shard_map there."""
  big = {"model.d_model": 256, "model.mlp_dim": 1024, "model.n_heads": 4, "model.n_kv_heads": 2}
  data = commands.compile_for(_config(**big), TOPOLOGY)["stages"][0]
  fsdp = commands.compile_for(_config(**big, **{"mesh.data": 1, "mesh.fsdp": 4}),
                              TOPOLOGY)["stages"][0]
  tensor = commands.compile_for(_config(**big, **{"mesh.data": 2, "mesh.tensor": 2}),
                                TOPOLOGY)["stages"][0]
  assert fsdp["argument_bytes"] < data["argument_bytes"] / 3, (fsdp, data)
  assert tensor["argument_bytes"] < data["argument_bytes"] * 0.7, (tensor, data)
  assert fsdp["pallas_kernels"] == tensor["pallas_kernels"] == 3


def _staged(**overrides):
  """_config grown after step 5 from 2 to 4 layers (identity), Adam's moments grown."""
  config = _config(**{"train.num_steps": 20, **overrides})
  config.stages = ({"step": 5, "model": {"n_layers": 4}, "plan": {"depth": "identity"}},)
  return config


@pytest.fixture(scope="module")
def staged_report():
  return commands.compile_for(_staged(), TOPOLOGY)


def test_every_stage_is_compiled(staged_report):
  """A staged run compiles each stage's model: the grown ones hold more state per chip."""
  stages = staged_report["stages"]
  assert [s["stage"] for s in stages] == [0, 1]
  assert stages[1]["params"] > 1.5 * stages[0]["params"]
  assert stages[1]["argument_bytes"] > stages[0]["argument_bytes"]


def test_eval_steps_and_growth_are_compiled_and_reported(staged_report):
  """Each stage's eval step (params and a batch in; held beside the train state) and the growth
  between them (the source state and the grown one at once) are compiled and counted."""
  stages, (growth,) = staged_report["stages"], staged_report["growth"]
  for s in stages:
    e = s["eval"]
    # Its arguments: the parameters and a batch, no Adam moments (two more copies of them).
    assert s["params"] * 4 < e["argument_bytes"] < s["argument_bytes"] / 2, (s, e)
    assert e["held_bytes"] == s["argument_bytes"]   # the train state stays on the device
    assert e["bytes_per_device"] >= e["held_bytes"] and e["fits"] and e["compile_seconds"] > 0
  assert (growth["stage"], growth["from_stage"], growth["step"]) == (1, 0, 5)
  # Each state: float32 params and Adam's two moments, replicated (mesh.data=4): >= 12 B/param;
  # the source's is stage 0's train-step arguments less its batch (8 x 128 int32, two of them).
  assert growth["source_state_bytes"] >= 12 * stages[0]["params"]
  assert growth["target_state_bytes"] >= 12 * stages[1]["params"]
  assert 0 < stages[0]["argument_bytes"] - growth["source_state_bytes"] <= 2 * 8 * 128 * 4
  assert growth["bytes_per_device"] >= growth["source_state_bytes"] + growth["target_state_bytes"]
  assert growth["bytes_per_device"] > max(s["bytes_per_device"] for s in stages)
  assert growth["fits"] and growth["compile_seconds"] > 0
  # The preservation report after it runs beside both states and reads one eval batch.
  report = growth["report"]
  assert report["held_bytes"] >= growth["source_state_bytes"] + growth["target_state_bytes"]
  assert report["bytes_per_device"] > report["held_bytes"] and report["programs"] == 1
  assert report["fits"] and report["compile_seconds"] > 0
  lines = aot.format_report(staged_report)
  assert [l.split(":")[1].strip() for l in lines[1:]] == [
      "stage 0", "stage 0 eval step", "growth to stage 1 after step 5 (Adam grow)",
      "preservation report at stage 1's growth", "stage 1", "stage 1 eval step"], lines
  assert re.search(r"growth to .*: \d+\.\d\d GiB per device \(stage 0's state \d+\.\d\d, "
                   r"stage 1's state \d+\.\d\d, temporaries .*\), fits; compiled in", lines[3])


def test_a_growth_that_does_not_fit_is_refused_naming_it(staged_report):
  """A device too small for both stages' states at once, though big enough for every train
  and eval step: the growth is refused, named, with what it needs and what the chip has."""
  hbm = max(p["bytes_per_device"] for s in staged_report["stages"] for p in (s, s["eval"]))
  devices = aot.topology_devices(TOPOLOGY)
  with pytest.raises(GrowlmError, match=r"^--compile_for=v5e:2x2: stage 1's growth \(from stage "
                     r"0\) needs \d+\.\d\d GiB per device \(stage 0's state .*\) and a TPU v5 "
                     r"lite device has 0\.00\d+ GiB; accepted: .*mesh\.fsdp > 1"):
    aot.compile_on(resolve(_staged()), devices, TOPOLOGY, TOPOLOGY, hbm,
                   growth=commands.GROWTH)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
  """(config, report): _config at 2 layers, d_model and mlp_dim doubled, grown by tile+identity
  (Adam's moments grown) from a 1-layer source run dir that holds its config.json and a
  checkpoint's directory but no weights: --compile_for reads none."""
  path = tmp_path_factory.mktemp("source")
  src = resolve(_config(**{"model.n_layers": 1}))
  (path / "config.json").write_text(json.dumps(src.to_json()))
  (path / "checkpoints" / "3").mkdir(parents=True)
  config = _config(**{"model.n_layers": 2, "model.d_model": 2 * src.model.d_model,
                      "model.mlp_dim": 2 * src.model.mlp_dim, "init.source": str(path),
                      "init.plan.width": "tile", "init.plan.depth": "identity",
                      "init.optimizer": "grow"})
  return config, commands.compile_for(config, TOPOLOGY)


def test_a_run_grown_from_a_source_compiles_the_growth_and_its_report(grown):
  """The run's first programs, the source grown into its first state (both states at once) and
  the preservation report after it (both states, a batch, both models' forward and the SGD step
  that counts the new units that train), are compiled and reported before its steps."""
  _, report = grown
  init, (stage,) = report["init"], report["stages"]
  assert 3 * init["source_params"] < stage["params"]
  # Each state: float32 params and Adam's two moments, replicated (mesh.data=4): >= 12 B/param.
  assert init["source_state_bytes"] >= 12 * init["source_params"]
  assert init["target_state_bytes"] >= 12 * stage["params"]
  assert init["bytes_per_device"] >= init["source_state_bytes"] + init["target_state_bytes"]
  r = init["report"]
  assert r["held_bytes"] >= init["source_state_bytes"] + init["target_state_bytes"]
  assert r["bytes_per_device"] > r["held_bytes"]
  assert r["programs"] == 2   # the float32 comparison; tile adds d_model coordinates: the step
  assert init["fits"] and r["fits"] and init["compile_seconds"] > 0 < r["compile_seconds"]
  lines = aot.format_report(report)
  assert [l.split(":")[1].strip() for l in lines[1:]] == [
      "growth from init.source (0.1M params) to stage 0 (Adam grow)",
      "preservation report at the growth from init.source", "stage 0", "stage 0 eval step"], lines
  assert re.search(r"\(Adam grow\): \d+\.\d\d GiB per device \(the source's state \d+\.\d\d, "
                   r"stage 0's state \d+\.\d\d, temporaries .*\), fits; compiled in", lines[1])
  assert re.search(r"init.source: \d+\.\d\d GiB per device \(both states and a batch "
                   r"\d+\.\d\d, temporaries \d+\.\d\d\), fits; compiled in", lines[2])


def test_a_preservation_report_that_does_not_fit_is_refused_naming_it(grown, monkeypatch):
  """A device that holds the growth from the source but not the report after it (a batch, the
  report's outputs and temporaries more): the report is refused, named, before the steps."""
  config, report = grown
  init = report["init"]
  assert init["report"]["bytes_per_device"] > init["bytes_per_device"]
  monkeypatch.setattr(aot, "hbm_bytes", lambda devices: init["bytes_per_device"])
  with pytest.raises(GrowlmError, match=r"^--compile_for=v5e:2x2: the preservation report at the "
                     r"growth from init.source needs \d+\.\d\d GiB per device \(both states and a "
                     r"batch .*\) and a TPU v5 lite device has 0\.00\d+ GiB; accepted: .*data\."
                     r"batch_size"):
    commands.compile_for(config, TOPOLOGY, steps_of=report)   # its steps are compiled already


def test_a_step_too_big_for_the_chip_is_refused():
  with pytest.raises(GrowlmError, match=r"does not fit a TPU v5 lite device .*accepted: .*"
                                        r"data.batch_size"):
    commands.compile_for(_config(**{"model.d_model": 1024, "model.mlp_dim": 8192,
                                    "model.n_layers": 8, "data.batch_size": 4096}), TOPOLOGY)


def test_an_eval_step_bigger_than_the_train_step_is_refused_naming_it():
  """Evaluation takes the whole global batch at once: under train.grad_accum=8 its step needs
  more than the train step's (about 16 MB per chip against 10 MB here), and a device that holds
  the train step but not it (train steps are checked first) refuses the eval step."""
  config = resolve(_config(**{"data.batch_size": 256, "train.grad_accum": 8}))
  devices = aot.topology_devices(TOPOLOGY)
  with pytest.raises(GrowlmError, match=r"stage 0's eval step needs .* \(train state and batch "
                                        r".*\) and a .* accepted: .*whatever train.grad_accum"):
    aot.compile_on(config, devices, TOPOLOGY, TOPOLOGY, 12 << 20)


def _cli(*flags: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "growlm.main", "--config=configs/default.py:size=nano,runlocal",
       "--config.model.max_len=128", "--config.data.seq_len=128", *flags],
      cwd=cwd or REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_command_line_prints_the_report_and_writes_nothing(tmp_path):
  (tmp_path / "configs").symlink_to(REPO / "configs")
  before = sorted(p.name for p in tmp_path.iterdir())
  out = _cli(f"--compile_for={TOPOLOGY}", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith(f"growlm: compiled for {TOPOLOGY}: 4 x TPU v5 lite"), lines
  assert re.search(r"stage 0: .*attention splash \(3 Pallas kernels\).* fits;", lines[1]), lines
  assert re.search(r"stage 0 eval step: .* GiB per device .* fits;", lines[2]), lines
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flag, env, message", [
    ("--compile_for=v5e", None, r"--compile_for='v5e'; accepted: a TPU topology name"),
    ("--compile_for=v9:2x2", None, r"--compile_for=v9:2x2: libtpu refused it \(.*\); accepted"),
    (f"--compile_for={TOPOLOGY}", {"TPU_LIBRARY_PATH": "/nonexistent/libtpu.so"},
     r"needs libtpu, which was not found; accepted: `make install`"),
    (f"--compile_for={TOPOLOGY} --workdir=runs/x", None,
     r"--compile_for=TOPOLOGY or --workdir=DIR, not both"),
    (f"--compile_for={TOPOLOGY} --config.mesh.tensor=8", None,
     r"mesh: 4 devices not divisible by fixed axes product 8"),
])
def test_bad_compile_for_input_is_one_line(flag, env, message):
  out = _cli(*flag.split(), env=env)
  assert out.returncode == 2, (out.stdout, out.stderr)
  errors = [l for l in out.stderr.splitlines() if l.startswith("growlm: error:")]
  assert len(errors) == 1 and re.search(message, errors[0]), out.stderr
  assert "Traceback" not in out.stderr and not out.stdout


@pytest.mark.parametrize("name, topology", [
    ("v5litepod-8", "v5e:2x4"), ("v5e-256", "v5e:16x16"), ("v6e-4", "v6e:2x2"),
    ("v4-8", "v4:2x2x1"), ("v4-32", "v4:2x2x4"), ("v5p-128", "v5p:4x4x4"),
    ("v5p:2x2x1", "v5p:2x2x1")])
def test_accelerator_types_name_their_topology(name, topology):
  """gcloud's accelerator types: v5e/v6e count chips, v4/v5p TensorCores (two per chip)."""
  assert aot.topology_name(name) == topology


@pytest.mark.parametrize("name", ["v4-6", "v5litepod-3", "v5p-1"])
def test_accelerator_types_of_no_slice_are_refused(name):
  with pytest.raises(GrowlmError, match=r"no v\w+ slice of that size; accepted: .*-"):
    aot.topology_name(name)


def test_an_accelerator_type_compiles_as_its_slice():
  report = commands.compile_for(_config(**{"mesh.data": -1}), "v4-16")
  assert (report["topology_name"], report["devices"], report["hosts"]) == ("v4:2x2x2", 8, 2)
  assert report["hbm_bytes_per_device"] == 32 << 30
  line = aot.format_report(report)[0]
  assert line.startswith("growlm: compiled for v4-16 (v4:2x2x2): 8 x TPU v4 (2 host(s)"), line


def test_a_cpu_step_profiled_after_libtpu_loads_still_has_its_events(tmp_path):
  """libtpu loads without its profiler hook: with it, a later CPU trace in the same process had
  no events, and benchmarks/parts.py read 0 ms for every part (a CI failure of this work)."""
  from conftest import load_benchmark  # pylint: disable=g-import-not-at-top
  parts = load_benchmark("parts")
  aot.topology_devices(TOPOLOGY)
  x = jax.numpy.ones((512, 512))
  step = jax.jit(lambda a: jax.nn.relu(a @ a).sum())
  compiled = step.lower(x).compile()
  got = parts.trace_jax(lambda: jax.block_until_ready(compiled(x)), compiled.as_text(),
                        str(tmp_path))
  assert sum(got.values()) > 0, got   # (a bare product is "other": no project scope)


@pytest.mark.parametrize("name, kind", [("v5litepod-1", "TPU v5 lite"), ("v6e:1x1", "TPU v6 lite")])
def test_one_chip_slices_are_described(name, kind):
  """Smaller than a host's default 2x2 chips: libtpu needs the host's bounds said."""
  devices = aot.topology_devices(name)
  assert len(devices) == 1 and devices[0].device_kind == kind


def test_environment_is_restored_after_the_topology_loads(monkeypatch):
  for key in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_LIBRARY_PATH"):
    monkeypatch.delenv(key, raising=False)
  devices = aot.topology_devices("v5p:2x2x1")
  assert len(devices) == 4 and devices[0].device_kind == "TPU v5"
  assert aot.hbm_bytes(devices) == 95 << 30
  for key in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_LIBRARY_PATH"):
    assert key not in os.environ


def test_benchmark_table_rows(tmp_path, capsys):
  """benchmarks/compile_for.py: one row per slice x style x remat, a refusal as its own row."""
  from conftest import load_benchmark  # pylint: disable=g-import-not-at-top
  bench = load_benchmark("compile_for")
  rows = bench.main(["--topologies", TOPOLOGY, "--styles", "gpt2", "--remats", "full,none",
                     "--n_layers", "1", "--per_chip", "4", "--out", str(tmp_path / "r.json")])
  assert [(r["style"], r["stages"][0]["remat"]) for r in rows] == [("gpt2", "full"),
                                                                   ("gpt2", "none")]
  assert rows[0]["stages"][0]["params"] == rows[1]["stages"][0]["params"]
  # full keeps less than none: the policy reaches the TPU compiler's plan. (At one sequence per
  # chip the loss's chunks set the peak, not the layer's activations: 4 make the difference.)
  assert rows[0]["stages"][0]["temp_bytes"] < rows[1]["stages"][0]["temp_bytes"]
  table = capsys.readouterr().out.splitlines()
  assert len(table) == 4 and table[2].startswith(f"| {TOPOLOGY} | gpt2 | full | splash |")
  huge = bench.main(["--topologies", TOPOLOGY, "--styles", "gpt2", "--n_layers", "1",
                     "--per_chip", "4096", "--out", str(tmp_path / "h.json")])
  assert "does not fit a TPU v5 lite device" in huge[0]["error"]


@pytest.mark.parametrize("topologies, message", [
    ("v5e", r"^growlm: error: --topologies='v5e'; accepted: a TPU topology name"),
    (f"{TOPOLOGY},v5litepod-3",
     r"^growlm: error: --topologies=v5litepod-3: no v5litepod slice of that size; accepted: "),
])
def test_benchmark_refuses_a_bad_topology_naming_its_own_flag(tmp_path, capsys, topologies,
                                                              message):
  """benchmarks/compile_for.py reads every topology before the first compile (no table row) and
  refuses a bad one naming its own flag, --topologies (the line named the trainer's
  --compile_for)."""
  from conftest import load_benchmark  # pylint: disable=g-import-not-at-top
  bench = load_benchmark("compile_for")
  with pytest.raises(SystemExit) as e:
    bench.main(["--topologies", topologies, "--out", str(tmp_path / "r.json")])
  out = capsys.readouterr()
  assert e.value.code == 2 and not out.out and not (tmp_path / "r.json").exists()
  assert len(out.err.splitlines()) == 1 and re.search(message, out.err), out.err


def test_a_sweep_compiles_each_distinct_step_once(tmp_path):
  """The launcher's --compile_for: every run of configs/quickstart.py over 2 seeds gets its
  slice report; runs with the same step (seeds, grown vs scratch) share one compile, and each
  growth from the source (tile, zeros) is compiled once, from the source run's config (it has
  not trained: the sweep dir does not exist)."""
  lines = []
  reports = sweep.compile_for(str(REPO / "configs" / "quickstart.py"), str(tmp_path / "q"),
                              "v5litepod-4", seeds=2, echo=lines.append)
  names = [f"{n}-s{k}" for n in ("source", "grown_tile", "grown_zeros", "scratch")
           for k in (0, 1)]
  assert sorted(reports) == sorted(names)
  assert len({id(r) for r in reports.values()}) == 4   # the source, each growth, the scratch run
  assert reports["grown_tile-s1"] is reports["grown_tile-s0"]
  two_x = reports["grown_tile-s0"]["stages"]   # the 2x step, compiled once
  assert reports["grown_zeros-s0"]["stages"] is two_x and reports["scratch-s1"]["stages"] is two_x
  assert two_x[0]["params"] > reports["source-s0"]["stages"][0]["params"]
  assert reports["scratch-s0"]["init"] is None
  assert reports["grown_zeros-s0"]["init"]["source_params"] == reports["source-s0"]["stages"][0][
      "params"]
  # The slice; each distinct step's train and eval lines; each distinct growth's line and its
  # report's; each repetition's one line.
  assert lines[0].startswith("growlm: compiled for v5litepod-4 (v5e:2x2)") and len(lines) == 15
  assert "[scratch-s0] the same step as [grown_tile-s0]" in lines
  assert "[grown_tile-s1] the same step and growth as [grown_tile-s0]" in lines
  assert any(l.startswith("[grown_zeros-s0] growth from init.source") for l in lines), lines
  assert not (tmp_path / "q").exists()


def test_a_sweep_run_that_does_not_fit_is_named(tmp_path):
  out = subprocess.run(
      [sys.executable, "experiments/launch.py", "--config=configs/quickstart.py",
       f"--sweep_dir={tmp_path / 'q'}", "--compile_for=v5e:2x2", "--only=scratch",
       "--config.data.batch_size=262144"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.returncode == 2, (out.stdout, out.stderr)
  errors = [l for l in out.stderr.splitlines() if l.startswith("growlm: error:")]
  assert len(errors) == 1 and errors[0].startswith(
      "growlm: error: sweep run 'scratch': stage 0's train step does not fit"), out.stderr
  assert not (tmp_path / "q").exists()
