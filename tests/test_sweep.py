"""Sweeps: expansion and order, dry-run and Cloud TPU commands, resume/skip, analysis, notebook."""

import json
import os
import shlex

import numpy as np
import pytest

from conftest import REPO, user_env
from growlm.experiments import analysis
from growlm.experiments import launcher, sweep
from growlm.errors import GrowlmError

QUICK = str(REPO / "configs" / "quickstart.py")
PAPER = str(REPO / "configs" / "paper.py")


def test_expand_orders_sources_first_and_resolves_references(tmp_path):
  runs = sweep.expand(QUICK, str(tmp_path / "s"))
  names = [r.name for r in runs]
  assert names[0] == "source" and set(names) == {"source", "grown_tile", "grown_zeros", "scratch"}
  tile = next(r for r in runs if r.name == "grown_tile")
  assert tile.depends == ["source"]
  assert tile.config.init.source == str(tmp_path / "s" / "source")
  assert tile.config.model.d_model == 128 and tile.config.init.plan.width == "tile"
  assert tile.config.sweep_name == "s" and tile.config.name == "grown_tile"


def test_seeds_repeat_every_run_with_its_own_source(tmp_path):
  """--seeds=2: NAME-s0, NAME-s1, each with train/data/init seeds offset by its index, each
  grown run growing the source of its own seed; the command line carries the seeds."""
  runs = sweep.expand(QUICK, str(tmp_path / "s"), {"train.seed": "5"}, seeds=2)
  by = {r.name: r for r in runs}
  assert set(by) == {f"{n}-s{k}" for n in ("source", "grown_tile", "grown_zeros", "scratch")
                     for k in (0, 1)}
  assert [r.name for r in runs][:2] == ["source-s0", "source-s1"]
  for k in (0, 1):
    tile = by[f"grown_tile-s{k}"].config
    assert (tile.train.seed, tile.data.seed, tile.init.seed) == (5 + k, k, k)
    assert tile.init.source == str(tmp_path / "s" / f"source-s{k}")
  line = sweep.command(QUICK, by["grown_tile-s1"], overrides={"train.seed": "5"})
  assert "--config.train.seed=6" in line and "--config.data.seed=1" in line
  assert f"--config.init.source={tmp_path / 's' / 'source-s1'}" in line
  assert sweep.base_name("grown_tile-s1", 2) == "grown_tile"
  assert sweep.base_name("grown_tile-s1", 1) == "grown_tile-s1"
  for bad in (0, -1, True, "2"):
    with pytest.raises(GrowlmError, match="--seeds"):
      sweep.expand(QUICK, str(tmp_path / "s"), seeds=bad)


def test_analysis_pools_repetitions_over_seeds(tmp_path):
  """Two seeds: each grown run is compared with the scratch run of its seed, then pooled: mean
  and sample standard deviation of the savings, and the plot draws one band per run."""
  for k, (scratch_final, grown_curve) in enumerate(((3.0, [3.5, 3.2, 2.9]),
                                                    (2.9, [3.5, 3.1, 2.8]))):
    _write_run(tmp_path, f"scratch-s{k}", [0, 100, 200], [5.0, 4.0, scratch_final])
    _write_run(tmp_path, f"source-s{k}", [0, 40], [5.0, 3.6], d_model=64)
    _write_run(tmp_path, f"grown-s{k}", [0, 50, 100], grown_curve,
               source=str(tmp_path / f"source-s{k}"), source_flops=40.0)
  (tmp_path / "sweep.json").write_text(json.dumps({"runs": [], "seeds": 2}))
  res = analysis.analyze(str(tmp_path))
  g = {x["run"]: x for x in res["grown"]}
  assert g["grown-s0"]["baseline"] == "scratch-s0" and g["grown-s1"]["baseline"] == "scratch-s1"
  s0 = g["grown-s0"]["datasets"]["heldout"]["savings"]
  s1 = g["grown-s1"]["datasets"]["heldout"]["savings"]
  assert s0 == pytest.approx(1 - (50 + 50 * 0.2 / 0.3) / 200)
  assert s1 == pytest.approx(1 - (50 + 50 * 0.2 / 0.3) / 200)   # 3.1 -> 2.8 crosses 2.9 there
  [p] = res["pooled"]
  assert (p["run"], p["dataset"], p["n"]) == ("grown", "heldout", 2)
  assert p["final_loss"]["mean"] == pytest.approx(2.85)
  assert p["final_loss"]["std"] == pytest.approx(np.std([2.9, 2.8], ddof=1))
  assert p["savings"]["mean"] == pytest.approx((s0 + s1) / 2)
  md = (tmp_path / "results.md").read_text()
  assert "## Over 2 seeds" in md and "| grown | tile+identity | heldout | 2 |" in md
  assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_paper_sweep_covers_the_experiment(tmp_path):
  runs = sweep.expand(PAPER, str(tmp_path / "p"))
  by = {r.name: r.config for r in runs}
  assert runs[0].name == "source"
  for target in ("both", "width", "depth"):
    assert f"{target}_scratch" in by
  assert {by[n].init.plan.width for n in by if n.startswith("both_")} >= {"zeros", "noise",
                                                                           "tile", "mean_fill"}
  assert by["both_zeros"].model.d_model == 2 * by["source"].model.d_model
  assert by["both_zeros"].model.n_layers == 2 * by["source"].model.n_layers
  assert by["width_tile"].model.n_layers == by["source"].model.n_layers
  assert by["depth_stack"].model.d_model == by["source"].model.d_model
  if (REPO.parent / "shared" / "datasets").exists():
    assert {"heldout", "shakespeare", "wikitext2"} <= set(by["source"].data.eval)


def test_paper_sweep_budgets_add_scratch_runs_with_their_own_schedules(tmp_path):
  runs = sweep.expand(PAPER + ":runlocal,budgets=1+2+4", str(tmp_path / "p"))
  by = {r.name: r.config for r in runs}
  one = by["both_scratch"]
  for b in (2, 4):
    c = by[f"both_scratch_{b}x"]
    assert c.model.d_model == one.model.d_model and c.model.n_layers == one.model.n_layers
    assert (c.train.num_steps, c.train.warmup_steps) == (b * one.train.num_steps,
                                                         b * one.train.warmup_steps)
    assert c.train.num_steps % c.checkpoint.every_steps == 0   # a checkpoint at the last step
    assert c.eval.every_steps == b * one.eval.every_steps       # as many evaluations as 1x
  assert "both_scratch_1x" not in by and "both_scratch_2x" not in {
      r.name for r in sweep.expand(PAPER + ":runlocal", str(tmp_path / "q"))}
  with pytest.raises(GrowlmError, match="budgets"):
    sweep.expand(PAPER + ":budgets=2x", str(tmp_path / "r"))


def test_scale_sweep_is_the_compute_its_docstring_says(tmp_path):
  """configs/scale.py over 3 seeds: 21 runs, source-sK grown three ways, scratch at 1x/2x/4x;
  its docstring's FLOPs (per seed and in total) within 3% of growlm.model.flops' count, and the
  held-out corpus is not the training corpus."""
  import re  # pylint: disable=g-import-not-at-top
  from growlm.config.typed import resolve  # pylint: disable=g-import-not-at-top
  from growlm.model import flops  # pylint: disable=g-import-not-at-top
  path = str(REPO / "configs" / "scale.py")
  runs = sweep.expand(path, str(tmp_path / "s"), seeds=3)
  assert len(runs) == 21
  total = 0.0
  for r in runs:
    c = resolve(r.config)
    total += (flops.flops_per_token(c.model, c.data.seq_len) * c.train.num_steps
              * c.data.batch_size * c.data.seq_len)
    assert dict(c.data.eval)["stdlib"] == "stdlib@all" and c.data.train.startswith("prepared:")
  doc = open(path).read()
  per_seed, three = (float(x) for x in re.search(
      r"([\d.]+e\+?\d+) per seed, ([\d.]+e\+?\d+) for three seeds", doc).groups())
  assert per_seed == pytest.approx(total / 3, rel=0.03)
  assert three == pytest.approx(total, rel=0.03)
  assert {r.name for r in sweep.expand(path + ":runlocal", str(tmp_path / "q"))} == {
      "source", "grown_tile", "grown_mean_fill", "grown_zeros", "scratch", "scratch_2x",
      "scratch_4x"}
  by = {r.name: r.config for r in runs}
  one = by["scratch-s0"]
  for b in (2, 4):   # each its own full schedule, evaluated as often as the others (the docstring)
    c = by[f"scratch_{b}x-s0"]
    assert (c.train.num_steps, c.train.warmup_steps, c.checkpoint.every_steps) == (
        b * one.train.num_steps, b * one.train.warmup_steps, b * one.checkpoint.every_steps)
    assert c.eval.every_steps == one.eval.every_steps


def test_dry_run_prints_runnable_commands(tmp_path):
  lines = []
  launcher.launch(QUICK, str(tmp_path / "s"), dry_run=True, echo=lines.append)
  assert len(lines) == 4 and not (tmp_path / "s").exists()
  grown = shlex.split(next(l for l in lines if "grown_zeros" in l))
  assert grown[:3] == ["python", "-m", "growlm.main"]
  assert f"--config.init.source={tmp_path / 's' / 'source'}" in grown
  assert "--config.init.plan.width=zeros" in grown and f"--workdir={tmp_path/'s'/'grown_zeros'}" \
      in grown


def test_tpu_commands_run_every_host(tmp_path):
  """--backend=gcloud: every command reaches all hosts of the slice (--worker=all), and the plan
  they run holds each run's growlm.main command (the worker adds --distributed)."""
  lines = []
  launcher.launch(QUICK, "gs://bucket/s", dry_run=True, backend="gcloud", tpu="v4-32",
               zone="us-central2-b", project="proj", echo=lines.append)
  gcloud = [shlex.split(l) for l in lines if l.startswith("gcloud ")]
  assert [a[4] for a in gcloud] == ["describe", "scp", "ssh", "ssh"]
  for args in gcloud:
    assert args[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    assert "--zone=us-central2-b" in args and "--project=proj" in args
  for args in gcloud[1:]:
    assert "--worker=all" in args
  start = next(a for a in gcloud[3] if a.startswith("--command="))
  assert "-m growlm.worker" in start and "--plan=gs://bucket/s/launch/" in start
  plan = [shlex.split(l[4:]) for l in lines if l.startswith("#   ")]
  assert len(plan) == 4 and all(p[:3] == ["python", "-m", "growlm.main"] for p in plan)
  assert any("adding --distributed" in l for l in lines)
  assert not (tmp_path / "s").exists()
  with pytest.raises(GrowlmError, match="zone"):
    launcher.launch(QUICK, "gs://bucket/s", dry_run=True, backend="gcloud", tpu="v4-32")


def test_bad_sweeps_are_refused(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from growlm.config import defaults as c\n"
                 "def get_config(arg=None):\n  return c.base_config('nano')\n"
                 "def sweep(add):\n  add(name='a', **{'init.source': '@missing'})\n")
  with pytest.raises(GrowlmError, match="missing"):
    sweep.expand(str(bad), str(tmp_path / "s"))
  bad.write_text(bad.read_text().replace("'init.source': '@missing'", "'model.colour': 1"))
  with pytest.raises(GrowlmError, match="colour"):
    sweep.expand(str(bad), str(tmp_path / "s"))
  bad.write_text(bad.read_text().replace("**{'model.colour': 1}", "").replace(
      "add(name='a', )", "add(name='a'); add(name='a')"))
  with pytest.raises(GrowlmError, match="twice"):
    sweep.expand(str(bad), str(tmp_path / "s"))


def _write_run(d, name, flops, losses, source=None, source_flops=0.0, d_model=128,
               num_steps=20, wall=None):
  run = d / name
  run.mkdir(parents=True)
  cfg = {"model": {"d_model": d_model, "n_layers": 4, "n_heads": 4, "mlp_dim": 512,
                   "norm_eps": 1e-5},
         "train": {"num_steps": num_steps}, "init": {"source": source or ""}}
  (run / "config.json").write_text(json.dumps(cfg))
  rows = []
  for i, (f, l) in enumerate(zip(flops, losses)):   # evenly to the last step: a finished run
    row = {"step": num_steps * i // (len(flops) - 1), "tokens": 100 * i, "flops": f,
           "eval_loss/heldout": l}
    if wall is not None:
      row["wall_seconds"] = wall[i]
    if source:
      row["flops_with_source"] = f + source_flops
    rows.append(row)
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if source:
    (run / "growth_report.json").write_text(json.dumps(
        {"method": "tile+identity", "source_flops": source_flops, "exact_expected": True,
         "max_abs_logit_diff": 1e-6}))


def test_analysis_numbers_on_known_curves(tmp_path):
  """Scratch: loss 5, 4, 3 at FLOPs 0, 100, 200. Grown: 3.5, 3.2, 2.9 at 0, 50, 100, with a
  source of 40 FLOPs. The grown run reaches 3.0 at 50 + 50 * 0.2/0.3 FLOPs."""
  _write_run(tmp_path, "scratch", [0, 100, 200], [5.0, 4.0, 3.0])
  _write_run(tmp_path, "source", [0, 40], [5.0, 3.6], d_model=64)
  _write_run(tmp_path, "grown", [0, 50, 100], [3.5, 3.2, 2.9], source=str(tmp_path / "source"),
             source_flops=40.0)
  _write_run(tmp_path, "never", [0, 50, 100], [3.5, 3.4, 3.3], source=str(tmp_path / "source"),
             source_flops=40.0)
  res = analysis.analyze(str(tmp_path))
  g = {x["run"]: x for x in res["grown"]}
  d = g["grown"]["datasets"]["heldout"]
  reach = 50 + 50 * 0.2 / 0.3
  assert g["grown"]["baseline"] == "scratch"
  assert d["flops_to_scratch_final"] == pytest.approx(reach)
  assert d["savings"] == pytest.approx(1 - reach / 200)
  assert d["savings_with_source"] == pytest.approx(1 - (reach + 40) / 200)
  assert d["scratch_loss_at_source_flops"] == pytest.approx(4.6)
  assert d["loss_after_growth"] == 3.5 and d["scratch_loss_step0"] == 5.0
  assert g["never"]["datasets"]["heldout"]["savings"] is None
  assert res["runs"]["source"]["kind"] == "source" and res["runs"]["scratch"]["kind"] == "scratch"
  md = (tmp_path / "results.md").read_text()
  assert "not reached" in md and f"{1 - reach / 200:.1%}" in md
  assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
  assert json.loads((tmp_path / "results.json").read_text())["grown"][0]["run"] == "grown"


def test_unfinished_runs_are_listed_not_compared(tmp_path):
  """A grown run, or the scratch run it would be compared with, short of its last step (still
  training, or stopped) gives no savings: its loss is not final. A sweep dir moved after launch
  still knows its source (by name: the grown runs' init.source names the old place)."""
  _write_run(tmp_path, "scratch", [0, 100, 200], [5.0, 4.0, 3.0])
  _write_run(tmp_path, "source", [0, 40], [5.0, 3.6], d_model=64)
  _write_run(tmp_path, "grown", [0, 50, 100], [3.5, 3.2, 2.9], source="/moved/away/source",
             source_flops=40.0)
  full = analysis.analyze(str(tmp_path), plot=False)
  assert full["grown"][0]["baseline"] == "scratch" and full["runs"]["scratch"]["finished"]
  assert full["runs"]["source"]["kind"] == "source"
  rows = (tmp_path / "scratch" / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "scratch" / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")   # at step 10
  part = analysis.analyze(str(tmp_path), plot=False)
  assert part["grown"] == [{"run": "grown", "baseline": None,
                            "unfinished": ["scratch at step 10 of 20"]}]
  assert part["pooled"] == [] and not part["runs"]["scratch"]["finished"]
  md = (tmp_path / "results.md").read_text()
  assert "| grown | unfinished: scratch at step 10 of 20 |" in md and "| 10 of 20 |" in md
  with pytest.raises(GrowlmError, match="holds no run dirs"):   # a run dir, not a sweep's
    analysis.analyze(str(tmp_path / "scratch"))
  assert sorted(os.listdir(tmp_path / "scratch")) == ["config.json", "metrics.jsonl"]
  (tmp_path / "empty").mkdir()
  with pytest.raises(GrowlmError, match="holds no run dirs"):
    analysis.analyze(str(tmp_path / "empty"))
  assert os.listdir(tmp_path / "empty") == []


def test_a_run_stopped_before_its_first_step_is_not_listed_at_step_0(tmp_path):
  """A sweep stopped before a run took a step (metrics.jsonl holds its step-0 eval only) lists
  it as before its first step: "at step 0" read as a step taken."""
  _write_run(tmp_path, "scratch", [0, 100, 200], [5.0, 4.0, 3.0])
  _write_run(tmp_path, "grown", [0, 50, 100], [3.5, 3.2, 2.9], source="/x/source")
  rows = (tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "grown" / "metrics.jsonl").write_text(rows[0] + "\n")
  res = analysis.analyze(str(tmp_path), plot=False)
  assert res["grown"][0]["unfinished"] == ["grown before its first step (of 20)"]
  assert "| grown | unfinished: grown before its first step (of 20) |" in (
      tmp_path / "results.md").read_text()


def test_frontier_wall_clock_and_growth_that_already_reached_the_target(tmp_path):
  """Scratch at 1x (loss 5, 4, 3 at FLOPs 0, 100, 200) and 2x the budget (5, 3.4, 2.6 at 0,
  100, 200, ...: its own schedule reaches 3.0 at 150 FLOPs): the frontier is the 2x run, so
  savings against it are 1 - reach / 150. A grown run already below 3.0 right after growth
  reads "reached at growth", never 100%, while its savings with the source stay a number."""
  _write_run(tmp_path, "scratch", [0, 100, 200], [5.0, 4.0, 3.0], wall=[0.0, 10.0, 20.0])
  _write_run(tmp_path, "scratch2x", [0, 100, 200, 400], [5.0, 3.4, 2.6, 2.2], num_steps=40)
  _write_run(tmp_path, "source", [0, 40], [5.0, 3.6], d_model=64)
  _write_run(tmp_path, "grown", [0, 50, 100], [3.5, 3.2, 2.9], source=str(tmp_path / "source"),
             source_flops=40.0, wall=[0.0, 4.0, 8.0])
  _write_run(tmp_path, "free", [0, 50], [2.95, 2.8], source=str(tmp_path / "source"),
             source_flops=40.0)
  res = analysis.analyze(str(tmp_path), plot=False)
  g = {x["run"]: x for x in res["grown"]}
  d = g["grown"]["datasets"]["heldout"]
  reach = 50 + 50 * 0.2 / 0.3
  assert g["grown"]["baseline"] == "scratch"            # the same budget stays the baseline
  assert d["frontier_run"] == "scratch2x" and d["frontier_flops"] == pytest.approx(150.0)
  assert d["savings_vs_frontier"] == pytest.approx(1 - reach / 150)
  assert d["savings_vs_frontier_with_source"] == pytest.approx(1 - (reach + 40) / 150)
  assert d["wall_seconds_to_scratch_final"] == pytest.approx(4.0 + 4.0 * (reach - 50) / 50)
  assert d["wall_savings"] == pytest.approx(1 - d["wall_seconds_to_scratch_final"] / 20.0)
  assert d["reached_at_growth"] is False
  # Equal compute: at the grown run's 100 FLOPs the frontier is the 2x run (3.4 against 4.0);
  # at 140 (+ the source's 40), 3.4 - 0.8 * 0.4 = 3.08. A run ending before 140 has no say.
  assert d["frontier_loss_at_final_flops"] == pytest.approx(3.4)
  assert d["final_vs_frontier"] == pytest.approx(2.9 - 3.4)
  assert d["frontier_loss_at_final_flops_with_source"] == pytest.approx(3.08)
  assert d["final_vs_frontier_with_source"] == pytest.approx(2.9 - 3.08)
  assert analysis.frontier_loss(300.0, "heldout", [{"rows": [], "name": "x"}]) is None
  pooled = {p["run"]: p for p in res["pooled"]}["grown"]["final_vs_frontier_with_source"]
  assert pooled["mean"] == pytest.approx(2.9 - 3.08) and pooled["n"] == 1
  row = [l for l in (tmp_path / "results.md").read_text().splitlines() if l.startswith("| grown")]
  assert row[0].rstrip(" |").endswith(f"{2.9 - 3.4:+.4f} | {2.9 - 3.08:+.4f}"), row[0]
  free = g["free"]["datasets"]["heldout"]
  assert free["reached_at_growth"] is True and free["savings"] is None
  assert free["savings_with_source"] == pytest.approx(1 - 40 / 200)
  row = [l for l in (tmp_path / "results.md").read_text().splitlines() if l.startswith("| free")]
  assert "reached at growth: source FLOPs only" in row[0] and "100.0%" not in row[0]
  assert f"{1 - 40 / 200:.1%}" in row[0]


def test_flops_to_reach_interpolates():
  f, l = np.array([0.0, 10.0, 20.0]), np.array([4.0, 2.0, 1.0])
  assert analysis.flops_to_reach(f, l, 3.0) == pytest.approx(5.0)
  assert analysis.flops_to_reach(f, l, 4.5) == 0.0
  assert analysis.flops_to_reach(f, l, 0.5) is None


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
  d = tmp_path_factory.mktemp("quick") / "sweep"
  launcher.launch(QUICK + ":runlocal", str(d), echo=lambda _: None)
  analysis.analyze(str(d))
  return d


@pytest.mark.slow
def test_quickstart_sweep_end_to_end_and_skip(quick_sweep):
  res = json.loads((quick_sweep / "results.json").read_text())
  assert {g["run"] for g in res["grown"]} == {"grown_tile", "grown_zeros"}
  tile = next(g for g in res["grown"] if g["run"] == "grown_tile")
  assert tile["baseline"] == "scratch" and tile["exact_expected"]
  assert tile["max_abs_logit_diff"] < 1e-4
  d = tile["datasets"]["heldout"]
  assert d["loss_after_growth"] < d["scratch_loss_step0"]   # the paper's first finding, here
  assert (quick_sweep / "loss_curves.png").exists()
  # A second launch finds every run finished and trains nothing.
  lines, called = [], []
  launcher.launch(QUICK + ":runlocal", str(quick_sweep), echo=lines.append,
               run_fn=lambda *a: called.append(a))
  assert not called and sum("finished, skipped" in l for l in lines) == 4
  # Changed flags: refused before anything runs, not the old results under the new settings.
  manifest = (quick_sweep / "sweep.json").read_text()
  for flag, field in (("train.lr", "train.lr"), ("model.n_layers", "model.n_layers")):
    with pytest.raises(GrowlmError, match=f"sweep run 'source': .*differs in {field}"):
      launcher.launch(QUICK + ":runlocal", str(quick_sweep), echo=lines.append,
                      run_fn=lambda *a: called.append(a), overrides={flag: "3"})
  assert not called and (quick_sweep / "sweep.json").read_text() == manifest


def test_an_error_in_a_run_names_the_run(tmp_path):
  cfg = tmp_path / "two.py"
  cfg.write_text("from growlm.config import defaults\n"
                 "def get_config(arg=None):\n  return defaults.base_config('nano')\n"
                 "def sweep(add):\n  add(name='a')\n  add(name='b')\n")
  started = []

  def run_fn(config, workdir):
    started.append(config.name)
    if config.name == "b":
      raise GrowlmError("file source pattern '/missing.txt' matches no file")

  with pytest.raises(GrowlmError, match="^sweep run 'b': file source pattern"):
    launcher.launch(str(cfg), str(tmp_path / "s"), echo=lambda _: None, run_fn=run_fn)
  assert started == ["a", "b"]


def test_sweep_json_is_written_before_the_first_run(tmp_path):
  """So that `launch.py status` follows a local sweep while it runs, or after a signal."""
  d, seen = tmp_path / "sweep", []
  launcher.launch(QUICK + ":runlocal", str(d), echo=lambda _: None,
                  run_fn=lambda cfg, workdir: seen.append(json.loads(
                      (d / "sweep.json").read_text())["runs"][0]["name"]))
  assert seen == ["source", "source", "source", "source"]


@pytest.mark.slow
def test_notebook_executes_headless(quick_sweep, monkeypatch):
  import nbformat  # pylint: disable=g-import-not-at-top
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GROWLM_SWEEP_DIR", str(quick_sweep))
  monkeypatch.setenv("XLA_FLAGS", user_env()["XLA_FLAGS"])   # the kernel: one CPU device
  nb = nbformat.read(str(REPO / "notebooks" / "loss_curves.ipynb"), as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  png = quick_sweep / "notebook_loss_curves.png"
  assert png.exists() and png.stat().st_size > 10_000
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert any("grown_tile" in o.get("data", {}).get("text/markdown", "") for o in outputs)
  samples = [o["data"]["text/markdown"] for o in outputs
             if o.get("data", {}).get("text/markdown", "").startswith("Samples")]
  assert len(samples) == 1
  rows = {line.split(" | ")[0].strip("| ") for line in samples[0].splitlines()[4:]}
  assert rows == {"source", "grown_tile", "grown_zeros", "scratch"}
  assert os.environ.get("GROWLM_SWEEP_DIR") == str(quick_sweep)


def test_notebook_on_an_empty_sweep_dir_stops_at_its_first_cell(tmp_path, monkeypatch):
  """A sweep dir with no run dirs is refused by the first code cell, by the checkout's own
  growlm (the notebook puts its checkout first on sys.path), before any plot is written."""
  import nbformat  # pylint: disable=g-import-not-at-top
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  from nbclient.exceptions import CellExecutionError  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GROWLM_SWEEP_DIR", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", user_env()["XLA_FLAGS"])
  nb = nbformat.read(str(REPO / "notebooks" / "loss_curves.ipynb"), as_version=4)
  with pytest.raises(CellExecutionError) as e:
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  assert "holds no run dirs" in str(e.value)
  assert str(REPO / "growlm" / "experiments" / "analysis.py") in str(e.value)
  ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
  assert len(ran) == 1 and os.listdir(tmp_path) == []
