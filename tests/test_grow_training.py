"""Growth meets training: optimizer state, LR multipliers, the grow command, grown runs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import REPO, run_config, user_env
from growlm.model import decoder as model
from growlm import optim
from growlm import commands
from growlm.train.loss import cross_entropy
from growlm.grow import GrowthPlan, grow
from growlm.grow.optimizer import grow_opt_state
from growlm.rundir import read_metrics
from growlm.model.config import make_model_config


REPORT_KEYS = ("method", "max_abs_logit_diff", "mean_abs_logit_diff", "kl_src_dst", "loss_src",
               "loss_dst", "src_params", "dst_params")


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _loss(cfg, p, t):
  return cross_entropy(model.apply(cfg, p, t[:, :-1]), t[:, 1:]).mean()


def _train_cfg(**kw):
  base = dict(lr=1e-2, warmup_steps=0, num_steps=10, schedule="constant", final_lr_ratio=1.0,
              b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.1, grad_clip=0.0)
  return ml_collections.ConfigDict({**base, **kw})


def _step(opt, cfg, p, s, t):
  g = jax.grad(lambda q: _loss(cfg, q, t))(p)
  u, s = opt.update(g, s, p)
  return optax.apply_updates(p, u), s


_apply = jax.jit(model.apply, static_argnums=0)


@pytest.mark.parametrize("style, width, dims", [
    ("gpt2", "tile", dict(d_model=128)),
    ("llama", "tile", dict(d_model=128)),
    ("llama", "zeros", dict(d_model=96)),
])
def test_grown_optimizer_takes_the_small_models_step(x64, style, width, dims):
  """Grown Adam moments + LR multipliers: one more step from the same batch leaves the grown
  model computing what the stepped small model computes (weight decay on)."""
  src = make_model_config("nano", style, dtype="float64", param_dtype="float64")
  dst = src.replace(**dims)
  plan = GrowthPlan(width=width)
  t = jax.random.randint(jax.random.key(2), (4, 17), 0, src.vocab_size)
  p = model.init_params(src, jax.random.key(0))
  opt_s = optim.make_optimizer(_train_cfg())
  s = opt_s.init(p)
  for _ in range(2):
    p, s = _step(opt_s, src, p, s, t)
  g = grow(p, src, dst, plan, jax.random.key(1))
  opt_d = optim.make_optimizer(_train_cfg(), lr_multipliers=True)
  sd = grow_opt_state(s, g, src, plan, opt_d)
  assert int(sd[0].count) == 2  # Adam's step count is kept
  p_small, _ = _step(opt_s, src, p, s, t)
  p_big, _ = _step(opt_d, g.config, g.params, sd, t)
  moved = float(jnp.abs(_apply(src, p_small, t) - _apply(src, p, t)).max())
  diff = float(jnp.abs(_apply(src, p_small, t) - _apply(g.config, p_big, t)).max())
  assert moved > 1e-3      # the step did change the function...
  assert diff < 1e-8       # ...and the grown model changed it the same way


def test_without_multipliers_tiled_readers_move_faster(x64):
  """docs/design.md 5.11: with fresh LR multipliers (all 1) a tiled model does not take the small
  model's step, because input-tiled matrices move n times faster."""
  src = make_model_config("nano", "gpt2", dtype="float64", param_dtype="float64")
  dst = src.replace(d_model=128)
  plan = GrowthPlan(width="tile")
  t = jax.random.randint(jax.random.key(2), (4, 17), 0, src.vocab_size)
  p = model.init_params(src, jax.random.key(0))
  opt_s = optim.make_optimizer(_train_cfg())
  s = opt_s.init(p)
  p, s = _step(opt_s, src, p, s, t)
  g = grow(p, src, dst, plan, jax.random.key(1))
  opt_d = optim.make_optimizer(_train_cfg())
  sd = grow_opt_state(s, g, src, plan, opt_d)
  p_small, _ = _step(opt_s, src, p, s, t)
  p_big, _ = _step(opt_d, g.config, g.params, sd, t)
  diff = float(jnp.abs(_apply(src, p_small, t) - _apply(g.config, p_big, t)).max())
  assert diff > 1e-4


_config = run_config


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("source")
  commands.train(_config(**{"train.num_steps": 30}), str(d))
  return d


def test_training_config_grows_from_source(source_run, tmp_path):
  """init.source + plan: report printed and saved, growth logged, loss keeps falling, FLOPs
  counted both without and with the source's."""
  c = _config(**{"init.source": str(source_run), "model.d_model": 128, "model.n_layers": 4,
                 "init.plan.width": "tile", "init.plan.depth": "identity",
                 "init.optimizer": "grow", "train.num_steps": 30, "eval.every_steps": 10})
  commands.train(c, str(tmp_path))
  report = json.loads((tmp_path / "growth_report.json").read_text())
  for k in REPORT_KEYS:
    assert k in report
  assert report["exact_expected"] and report["max_abs_logit_diff"] < 1e-4
  assert report["dst_params"] > report["src_params"]
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert rows[0]["event"] == "growth" and rows[0]["step"] == 0
  evals = [r for r in rows if "eval_loss/heldout" in r]
  assert evals[0]["eval_loss/heldout"] == pytest.approx(report["loss_dst"], rel=1e-5)
  assert evals[-1]["eval_loss/heldout"] < evals[0]["eval_loss/heldout"] - 0.02
  src_meta = [r for r in read_metrics(str(source_run / "metrics.jsonl")) if "flops" in r][-1]
  last = rows[-1]
  assert last["flops_with_source"] == pytest.approx(last["flops"] + src_meta["flops"])


def _grow_cli(args):
  env = user_env()
  return subprocess.run([sys.executable, "-m", "growlm.grow_main", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=300)


def test_grow_command_writes_a_run_dir_that_trains_on(source_run, tmp_path):
  out = tmp_path / "grown"
  target = ["--config=configs/default.py:size=nano,runlocal", "--config.model.d_model=96",
            "--config.model.mlp_dim=384", "--config.init.plan.width=mean_fill",
            "--config.log.progress_bar=False"]
  r = _grow_cli([*target, f"--source={source_run}", f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "max |delta logits|" in r.stdout  # the report is printed
  report = json.loads((out / "growth_report.json").read_text())
  assert report["method"] == "mean_fill" and report["max_abs_logit_diff"] < 1e-4
  assert sorted(os.listdir(out / "checkpoints")) == ["0"]
  assert not (tmp_path / "grown.partial").exists()
  env = user_env()
  cont = subprocess.run([sys.executable, "-m", "growlm.main", *target, f"--workdir={out}",
                         "--config.train.num_steps=10"], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=300)
  assert cont.returncode == 0, cont.stderr[-3000:]
  assert "step=10" in cont.stdout


@pytest.mark.parametrize("extra, words", [
    (["--config.model.d_model=32"], "d_model"),                       # shrinking
    (["--config.model.norm=rmsnorm"], "norm"),                        # style change
    (["--config.model.d_model=96", "--config.init.plan.width=tile"], "tile"),
    (["--config.init.plan.width=magic"], "width"),
])
def test_grow_command_refusals_write_nothing(source_run, tmp_path, extra, words):
  out = tmp_path / "grown"
  r = _grow_cli(["--config=configs/default.py:size=nano,runlocal", *extra,
                 f"--source={source_run}", f"--out={out}"])
  assert r.returncode == 2
  err = [l for l in r.stderr.splitlines() if l.startswith("growlm: error:")]
  assert len(err) == 1 and words in err[0], r.stderr[-2000:]
  assert not out.exists() and not (tmp_path / "grown.partial").exists()


def test_bad_source_is_one_line(tmp_path):
  r = _grow_cli(["--config=configs/default.py:size=nano,runlocal",
                 f"--source={tmp_path}/nothing", f"--out={tmp_path}/o"])
  assert r.returncode == 2 and "does not exist" in r.stderr
  assert not (tmp_path / "o").exists()


def test_growth_source_shorter_than_seq_len_is_refused(source_run, tmp_path):
  """A learned-position source cannot be measured on longer sequences than its table."""
  from growlm.errors import GrowlmError  # pylint: disable=g-import-not-at-top
  c = _config(**{"init.source": str(source_run), "model.max_len": 512, "data.seq_len": 300})
  with pytest.raises(GrowlmError, match="max_len=256") as e:
    commands.train(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_growth_that_rescales_norm_eps_says_so(source_run, tmp_path, capsys):
  """Zero-padding d_model rescales norm_eps by D/D' (docs/design.md 5.2): the config's own
  norm_eps is replaced, and that is printed, never silent. The caller's config is not changed."""
  from growlm.config.typed import resolve  # pylint: disable=g-import-not-at-top
  from growlm.init import seam  # pylint: disable=g-import-not-at-top
  c = _config(**{"init.source": str(source_run), "model.d_model": 128, "model.n_heads": 4,
                 "init.plan.width": "zeros"})
  user_eps = c.model.norm_eps
  effective, src = seam.prepare(resolve(c), str(tmp_path / "run"))
  line = [l for l in capsys.readouterr().out.splitlines() if "model.norm_eps" in l]
  assert src is not None and effective.model.norm_eps == pytest.approx(user_eps * 64 / 128)
  assert len(line) == 1 and f"{user_eps:g} -> {user_eps * 64 / 128:g}" in line[0], line
  assert c.model.norm_eps == user_eps and not (tmp_path / "run").exists()
  # tile keeps the norm statistics: nothing to rescale, nothing printed.
  c.init.plan.width = "tile"
  effective, _ = seam.prepare(resolve(c), str(tmp_path / "run"))
  assert effective.model.norm_eps == user_eps and "norm_eps" not in capsys.readouterr().out


def test_init_fields_without_a_source_are_named_as_having_no_effect(tmp_path, capsys):
  """A plan (a sweep-wide flag reaches the scratch run too) without init.source starts from a
  random init: said in one line naming the fields, and nothing said for a plain config."""
  from growlm.config.typed import resolve  # pylint: disable=g-import-not-at-top
  from growlm.init import seam  # pylint: disable=g-import-not-at-top
  _, src = seam.prepare(resolve(_config(**{"init.plan.width": "zeros", "init.optimizer": "grow",
                                           "init.seed": 3})), str(tmp_path / "run"))
  lines = [l for l in capsys.readouterr().out.splitlines() if "no effect" in l]
  assert src is None and len(lines) == 1, lines
  assert "init.plan, init.optimizer have no effect" in lines[0] and "seed" not in lines[0]
  seam.prepare(resolve(_config()), str(tmp_path / "run"))
  assert "no effect" not in capsys.readouterr().out
  # Growth stages inside the run apply the learning-rate options (docs/design.md 5.11).
  from growlm.config import files  # pylint: disable=g-import-not-at-top
  staged = files.load(str(REPO / "configs" / "staged.py") + ":runlocal")
  staged.init.lr_rescale, staged.init.lr_multipliers = "fan_in", True
  staged.init.plan.width = "zeros"
  seam.prepare(resolve(staged), str(tmp_path / "run"))
  lines = [l for l in capsys.readouterr().out.splitlines() if "no effect" in l]
  assert len(lines) == 1 and "init.plan has no effect" in lines[0], lines
