"""Growth stages inside one run (growlm.config.stages): equal to growth between two runs,
resumable in any stage, FLOPs integrated over stages, one schedule with optional re-warmup."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import one_line_naming, run_config
from growlm import commands
from growlm.config import stages as stages_lib
from growlm.config.typed import resolve
from growlm.errors import GrowlmError
from growlm.init import source as source_lib
from growlm.model import flops as flops_lib
from growlm.rundir import read_metrics
from growlm.train import stages as train_stages
from growlm.train.checkpoint import Checkpoints

STEPS, AT = 12, 6
GROW = {"d_model": 128, "n_heads": 4, "mlp_dim": 512, "n_layers": 4}
PLAN = {"width": "tile", "depth": "identity"}


def _config(**overrides):
  c = run_config(**{"train.num_steps": STEPS, "train.warmup_steps": 2,
                    "eval.every_steps": AT, "checkpoint.every_steps": AT,
                    "log.every_steps": 1, **overrides})
  return c


def _staged(**overrides):
  c = _config(**overrides)
  c.stages = ({"step": AT, "model": GROW, "plan": PLAN, "optimizer": "grow"},)
  return c


def _final(workdir):
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return ckpt.manager.restore(ckpt.steps()[-1])["state"]["params"]
  finally:
    ckpt.close()


def _metrics(workdir):
  return read_metrics(os.path.join(workdir, "metrics.jsonl"))


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("stages") / "staged")
  commands.train(_staged(), wd)
  return wd


def test_a_two_stage_run_equals_growth_between_two_runs(staged_run, tmp_path):
  """Run A stops at the stage step; run B grows A by the same plan and goes on along the same
  schedule and data (init.continue_schedule): B's final parameters are A+B's, bit for bit."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  commands.train(_staged(**{"train.stop_at": AT}), a)
  grown = stages_lib.models(resolve(_config()).model, resolve(_staged()).stages)[1]
  c = _config(**{"init.source": a, "init.optimizer": "grow", "init.continue_schedule": True,
                 "init.seed": 1})
  for k, v in grown.to_dict().items():
    c.model[k] = v
  c.init.plan.width, c.init.plan.depth = PLAN["width"], PLAN["depth"]
  commands.train(c, b)
  one, two = _final(staged_run), _final(b)
  assert jax.tree.structure(one) == jax.tree.structure(two)
  for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_array_equal(x, y)
  end_one = [r for r in _metrics(staged_run) if r["step"] == STEPS and "train_loss" in r][-1]
  end_two = [r for r in _metrics(b) if r["step"] == STEPS and "train_loss" in r][-1]
  assert end_one["train_loss"] == end_two["train_loss"]
  assert end_one["lr"] == end_two["lr"]
  # FLOPs: the staged run counts both stages itself; B counts A's as its source's.
  assert end_one["flops_with_source"] == pytest.approx(end_two["flops_with_source"], rel=1e-12)
  assert end_two["flops"] < end_one["flops"]


def test_flops_integrate_over_stages_and_growth_is_logged(staged_run):
  cfg = resolve(_staged())
  small, big = stages_lib.models(cfg.model, cfg.stages)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  fpt = [flops_lib.flops_per_token(m, cfg.data.seq_len) for m in (small, big)]
  rows = _metrics(staged_run)
  last = [r for r in rows if r["step"] == STEPS][-1]
  assert last["flops"] == pytest.approx(tokens * (AT * fpt[0] + (STEPS - AT) * fpt[1]))
  growth = [r for r in rows if r.get("event") == "growth"]
  assert len(growth) == 1 and growth[0]["stage"] == 1 and growth[0]["step"] == AT
  assert growth[0]["flops"] == pytest.approx(tokens * AT * fpt[0])
  assert growth[0]["max_abs_logit_diff"] < 1e-4          # tile + identity is exact
  report = json.load(open(os.path.join(staged_run, "growth_stage1.json")))
  assert report["stage"] == 1 and report["step"] == AT and report["dst_params"] > \
      report["src_params"]
  # The run dir is a growth source (and a sampling one) holding its last stage's model.
  src = source_lib.read_source(staged_run)
  assert (src.model.d_model, src.model.n_layers) == (GROW["d_model"], GROW["n_layers"])


def test_a_staged_run_resumes_at_the_stage_step(staged_run, tmp_path):
  """Stopped at the stage step (its checkpoint holds the model before the growth), then
  relaunched: it grows again, ends with the same parameters bit for bit, one growth line."""
  wd = str(tmp_path / "run")
  commands.train(_staged(**{"train.stop_at": AT}), wd)
  commands.train(_staged(), wd)
  for x, y in zip(jax.tree.leaves(_final(staged_run)), jax.tree.leaves(_final(wd))):
    np.testing.assert_array_equal(x, y)
  assert len([r for r in _metrics(wd) if r.get("event") == "growth"]) == 1


def test_one_schedule_with_rewarm():
  c = _staged()
  c.stages = ({"step": AT, "model": GROW, "plan": PLAN, "rewarm_steps": 4},)
  cfg = resolve(c)
  plain = train_stages.make_schedule(resolve(_staged()))
  rewarm = train_stages.make_schedule(cfg)
  for step in (0, 3, AT - 1):
    assert float(rewarm(step)) == pytest.approx(float(plain(step)))
  assert float(rewarm(AT)) == 0.0
  assert float(rewarm(AT + 2)) == pytest.approx(0.5 * float(plain(AT + 2)))
  for step in (AT + 4, STEPS - 1):
    assert float(rewarm(step)) == pytest.approx(float(plain(step)))


@pytest.mark.parametrize("stage, says", [
    ({"step": STEPS, "model": GROW}, ("stages[0].step", "< train.num_steps")),
    ({"step": 0, "model": GROW}, ("stages[0].step", ">= 1")),
    ({"step": AT, "model": {"d_model": 100}}, ("stages[0]", "d_model")),
    ({"step": AT, "model": {"width": 128}}, ("stages[0].model", "'width'")),
    ({"step": AT, "model": GROW, "optimizer": "adam"}, ("stages[0].optimizer", "fresh")),
    ({"step": AT, "model": GROW, "rewarm": 3}, ("stages[0]", "rewarm_steps")),
    ({"model": GROW}, ("stages[0]", "'step'")),
    (5, ("stages[0]=5", "such as {'step': 250")),
    ({"step": AT, "model": 128}, ("stages[0].model=128", "such as {'d_model': 128, 'n_layers'")),
    ({"step": AT, "model": GROW, "plan": "tile"}, ("stages[0].plan='tile'", "such as {'width'")),
    ({"step": AT, "model": GROW, "plan": {"depht": "identity"}}, ("stages[0].plan", "'depht'")),
    ({"step": AT, "model": GROW, "plan": {"width": "tyle"}}, ("stages[0].plan", "tyle")),
])
def test_bad_stages_are_one_line(stage, says):
  c = _config()
  c.stages = (stage,)
  with pytest.raises(GrowlmError) as e:
    resolve(c)
  one_line_naming(e, *says)


def test_stages_must_increase_and_follow_a_continued_source():
  c = _config()
  c.stages = ({"step": AT, "model": GROW}, {"step": AT, "model": {"n_layers": 8}})
  with pytest.raises(GrowlmError) as e:
    resolve(c)
  one_line_naming(e, "stages[1].step", f"> {AT}")
  c.stages = ({"step": 4, "model": {"n_layers": 4}},
              {"step": 8, "model": {"n_layers": 8}, "plan": {"depth": "stack"}})
  cfg = resolve(c)
  assert [m.n_layers for m in stages_lib.models(cfg.model, cfg.stages)] == [2, 4, 8]
  assert [stages_lib.index_at(cfg.stages, k) for k in (0, 4, 5, 8, 9)] == [0, 0, 1, 1, 2]


def test_the_analysis_reads_a_staged_run_as_grown_from_scratch(staged_run):
  """A staged run has no source and no loss right after growth; it pairs with scratch runs of
  its final size and never reads "reached at growth"."""
  from growlm.curves import is_grown, load_run  # pylint: disable=g-import-not-at-top
  from growlm.experiments import analysis  # pylint: disable=g-import-not-at-top
  run = load_run(staged_run)
  assert is_grown(run)
  assert analysis._arch(run)["d_model"] == GROW["d_model"]  # pylint: disable=protected-access
  out = analysis.compare(run, run)
  assert out["method"] == f"stages tile+identity@{AT}" and out["source_flops"] == 0.0
  d = out["datasets"]["heldout"]
  assert d["loss_after_growth"] is None and not d["reached_at_growth"]
  assert d["savings"] == pytest.approx(0.0) == d["savings_with_source"]


def test_a_staged_run_on_a_sharded_mesh_resumes_inside_stage_1(staged_run, tmp_path):
  """On a (data 2, fsdp 2, tensor 2) mesh the growth runs sharded; stopped inside stage 1 and
  relaunched (the checkpoint restores with the grown model's shapes and shardings), the run ends
  as on one device: the same final train loss up to float32 summation order (1e-6 relative
  measured)."""
  wd = str(tmp_path / "sharded")
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  for stop in (AT + 2, 0):
    c = _staged(**{"train.stop_at": stop, "checkpoint.every_steps": AT + 2})
    c.mesh = mesh
    commands.train(c, wd)
  growth = [r for r in _metrics(wd) if r.get("event") == "growth"]
  assert len(growth) == 1 and growth[0]["max_abs_logit_diff"] < 1e-4
  one, eight = ([r for r in _metrics(w) if r["step"] == STEPS and "train_loss" in r][-1]
                for w in (staged_run, wd))
  assert eight["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
  assert eight["flops"] == one["flops"]


def test_the_plot_marks_a_stage_where_it_happened(staged_run, tmp_path):
  from growlm import curves  # pylint: disable=g-import-not-at-top
  run = curves.load_run(staged_run)
  growth = [r for r in run["rows"] if r.get("event") == "growth"][0]
  assert curves.stage_flops(run) == [growth["flops"]] and growth["flops"] > 0
  assert os.path.getsize(curves.plot_loss_curves([run], str(tmp_path / "c.png"))) > 0


def test_a_staged_run_is_compared_with_scratch_of_its_final_size_and_steps(staged_run):
  """Its baseline is the scratch run as long as its last stage (steps after the last growth),
  as for a run grown from a source, not the one as long as the whole staged run."""
  import copy  # pylint: disable=g-import-not-at-top
  from growlm.curves import load_run  # pylint: disable=g-import-not-at-top
  from growlm.experiments import analysis  # pylint: disable=g-import-not-at-top
  run = load_run(staged_run)
  scratch = []
  for steps in (STEPS, STEPS - AT):
    r = copy.deepcopy(run)
    r["name"], r["config"]["stages"] = f"scratch_{steps}", []
    r["config"]["model"] = stages_lib.final_model(run["config"])
    r["config"]["train"]["num_steps"] = steps
    scratch.append(r)
  assert analysis.find_baseline(run, [run, *scratch])["name"] == f"scratch_{STEPS - AT}"


def test_continue_schedule_refusals_are_one_line(staged_run):
  """A Hugging Face source has no schedule to continue; a source already at train.num_steps
  leaves nothing to train."""
  c = resolve(_config(**{"init.source": staged_run, "init.continue_schedule": True}))
  with pytest.raises(GrowlmError) as e:
    source_lib.check_init(c, source_lib.read_source(staged_run))
  one_line_naming(e, "continue_schedule", f"step {STEPS}", f"num_steps > {STEPS}")
  hf = source_lib.Source("/x/hf", {}, resolve(_config()).model, hf=True)
  with pytest.raises(GrowlmError) as e:
    source_lib.check_init(c, hf)
  one_line_naming(e, "continue_schedule", "Hugging Face", "accepted")


def test_stages_before_a_continued_sources_step_are_refused_before_the_run_dir(staged_run,
                                                                               tmp_path):
  """init.continue_schedule starts at the source's step (12): a stage at step 6 lies behind it.
  The trainer refuses with one line once it knows that step, before it writes the run dir."""
  c = _config(**{"init.source": staged_run, "init.continue_schedule": True,
                 "train.num_steps": 2 * STEPS, **{f"model.{k}": v for k, v in GROW.items()}})
  c.stages = ({"step": AT, "model": {"n_layers": 8}, "plan": {"depth": "stack"}},)
  wd = tmp_path / "behind"
  with pytest.raises(GrowlmError) as e:
    commands.train(c, str(wd))
  one_line_naming(e, f"stages[0].step={AT}", f"step {STEPS}", f"stage steps > {STEPS}")
  assert not wd.exists()
