"""benchmarks/torch_reference.py computes and optimises what growlm does.

Same weights in both (a growlm tree loaded into the torch model): logits agree to 1e-5; three
AdamW steps on one batch give the same losses and the same parameters as growlm's own train step
(growlm.train.trainer.make_train_step with growlm.optim.make_optimizer); train_throughput's
fields are consistent. No timing thresholds.
"""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from growlm import optim  # noqa: E402
from growlm.config import defaults as config_lib  # noqa: E402
from growlm.config.typed import resolve  # noqa: E402
from growlm.model import decoder  # noqa: E402
from growlm.model.config import make_model_config  # noqa: E402
from growlm.train import trainer  # noqa: E402
from growlm.train.state import TrainState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
from benchmarks import torch_reference as tr  # noqa: E402  pylint: disable=wrong-import-position

NANO = make_model_config("nano", "gpt2", max_len=32)
# GQA (2 query heads per kv head) with head_dim 24 != d_model / n_heads = 16.
GQA = make_model_config("nano", "gpt2", max_len=32, n_heads=4, n_kv_heads=2, head_dim=24)

# Test hyperparameters, identical on both sides, chosen so every part of AdamW shows: clipping
# bites (grad norms here are 1.2-1.8 > 0.5), decay is strong (lr * wd = 1e-2 a step), and eps
# (1e-4) is large enough that Adam's first steps are not sign(g): with eps = 1e-8 an entry whose
# gradient is rounding noise (the key bias's gradient is exactly 0 in exact arithmetic, softmax
# being shift-invariant) moves by +-lr in either framework, so such entries could not be compared.
HYPER = dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-4, weight_decay=1.0, grad_clip=0.5)
STEPS = 3


def _params(cfg, seed=0):
  """A growlm parameter tree in growlm's own layout (abstract_params), with random values in
  every leaf (norm gains near 1, biases nonzero) so that no leaf can be mis-placed unseen."""
  shapes, _ = decoder.abstract_params(cfg)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    last = path[-1].key
    small = last == "scale" or "bias" in last
    x = rng.normal(0.0, 0.05 if small else 0.02, s.shape).astype(np.float32)
    return x + 1.0 if last == "scale" else x
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _tokens(cfg, batch=2, length=16, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, length + 1))


@pytest.fixture(scope="module")
def growlm_run():
  """growlm's train step, STEPS times on one batch of GQA: (params, tokens, losses, params)."""
  params, ids = _params(GQA), _tokens(GQA)
  tcfg = dataclasses.replace(resolve(config_lib.base_config("nano", "gpt2")).train, **HYPER)
  schedule = optim.make_schedule(tcfg.lr, 0, 10, "constant")
  optimizer = optim.make_optimizer(tcfg, schedule)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optimizer.init(params), rng=jax.random.PRNGKey(0))
  batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32),
           "targets": jnp.asarray(ids[:, 1:], jnp.int32)}
  step = jax.jit(trainer.make_train_step(GQA, optimizer, schedule))
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train_loss"]))
  return params, ids, losses, jax.device_get(state.params)


def test_available_and_defaults():
  assert tr.available() is None
  train = config_lib.base_config().train
  assert tr.DEFAULTS == {k: train[k] for k in tr.DEFAULTS}


def test_other_styles_are_refused_naming_the_field():
  with pytest.raises(ValueError, match="norm="):
    tr.GPT(make_model_config("nano", "llama"))
  with pytest.raises(ValueError, match="tie_embeddings="):
    tr.GPT(NANO.replace(tie_embeddings=False))


@pytest.mark.parametrize("cfg", [NANO, GQA], ids=["nano", "gqa"])
def test_logits_match_growlm(cfg):
  params, ids = _params(cfg), _tokens(cfg)
  model = tr.GPT(cfg).eval()
  tr.load_growlm_params(model, params)
  with torch.no_grad():
    got = model(torch.from_numpy(ids[:, :-1])).numpy()
  inputs = jnp.asarray(ids[:, :-1], jnp.int32)
  want = np.asarray(decoder.apply(cfg, params, inputs))
  assert got.shape == want.shape == (2, 16, cfg.vocab_size)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_adamw_steps_match_growlm(growlm_run):
  """Same losses and same parameters after STEPS steps of clipped, masked-decay AdamW.

  Parameters are compared entry by entry (rtol 1e-5, atol 1e-6, against updates of ~1e-2 a
  step): a wrong decay mask (decay on biases, or none on the position table), no clipping, or
  eps in another place each move some entry by 2e-3 or more here.
  """
  params, ids, want_losses, want_params = growlm_run
  model = tr.GPT(GQA)
  tr.load_growlm_params(model, params)
  h = dict(HYPER)
  clip = h.pop("grad_clip")
  optimizer = tr.make_optimizer(model, device="cpu", **h)
  step = tr.make_step(model, optimizer, torch.from_numpy(ids[:, :-1]),
                      torch.from_numpy(ids[:, 1:]), grad_clip=clip)
  losses = [float(step()) for _ in range(STEPS)]
  # float32 losses near 5.5 (one ulp is 4.8e-7) computed in different orders.
  np.testing.assert_allclose(losses, want_losses, rtol=0, atol=1e-5)
  assert losses[-1] < losses[0] - 0.1
  expected = tr.GPT(GQA)
  tr.load_growlm_params(expected, want_params)
  want_sd = expected.state_dict()
  for name, got in model.state_dict().items():
    np.testing.assert_allclose(got.numpy(), want_sd[name].numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_train_throughput_fields_and_losses(growlm_run):
  """The benchmark's own loop (eager) on growlm's weights: growlm's losses, consistent rates."""
  params, ids, want_losses, _ = growlm_run
  out = tr.train_throughput(GQA, ids, steps=STEPS - 2, warmup=1, compile=False, params=params,
                            **HYPER)
  B, L = ids.shape[0], ids.shape[1] - 1
  assert (out["batch"], out["seq_len"]) == (B, L)
  assert out["compiled"] is False and out["compile_error"] is None
  assert out["compile_seconds"] == 0.0 and out["first_step_seconds"] > 0
  assert len(out["step_seconds"]) == STEPS - 2
  assert out["median_step_seconds"] == np.median(out["step_seconds"])
  assert out["tokens_per_sec"] > 0
  assert out["tokens_per_sec"] == pytest.approx(B * L / out["median_step_seconds"], rel=1e-12)
  np.testing.assert_allclose(out["losses"], want_losses, rtol=0, atol=1e-5)
  assert out["final_loss"] == out["losses"][-1]
  assert out["peak_memory_bytes"] is None
  assert (out["device"], out["dtype"]) == ("cpu", "float32")
  assert out["torch"] == torch.__version__ and out["threads"] >= 1


def test_train_throughput_runs_eager_when_compile_fails(growlm_run, monkeypatch, capsys):
  """A torch.compile failure (raised at the first call, as compiler errors are) is recorded and
  printed, and the run goes on eager from the same starting weights."""
  params, ids, want_losses, _ = growlm_run

  def broken_compile(model, **_):
    def run(*args, **kwargs):
      model(*args, **kwargs)  # runs a forward, then fails like a compiler error
      raise RuntimeError("no compiler here\nsecond line")
    return run
  monkeypatch.setattr(tr.torch, "compile", broken_compile)
  out = tr.train_throughput(GQA, ids, steps=1, warmup=1, compile=True, params=params, **HYPER)
  assert out["compiled"] is False
  assert out["compile_error"] == "RuntimeError: no compiler here"
  assert "torch.compile failed" in capsys.readouterr().out
  np.testing.assert_allclose(out["losses"], want_losses, rtol=0, atol=1e-5)
