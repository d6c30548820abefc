"""benchmarks/knobs.py and benchmarks/device_checks.py in --quick mode: what they report
follows from what they measured, and the knobs they report are the ones the step ran with."""

import statistics

import pytest

from conftest import all_eqns, load_benchmark, positive_finite

from growlm.model import flops
from growlm.model.config import make_model_config


def test_variants_parse_and_bad_ones_are_named():
  knobs = load_benchmark("knobs")
  assert knobs.parse_variants("default; remat=full,loss_chunk=64 ;batch=8") == [
      {}, {"remat": "full", "loss_chunk": 64}, {"batch": 8}]
  for bad, says in (("remat", "KNOB=VALUE"), ("depth=3", "KNOB=VALUE"), (" ; ", "no variant"),
                    ("batch=-2", "batch='-2'; accepted: an integer >= 1"),
                    ("loss_chunk=x", "loss_chunk='x'; accepted: an integer >= 0")):
    with pytest.raises(ValueError, match=says):
      knobs.parse_variants(bad)


def test_knobs_quick_reports_the_resolved_knobs_and_its_arithmetic(tmp_path):
  knobs = load_benchmark("knobs")
  result = knobs.main(["--quick", "--variants", "default; loss_chunk=8,remat=full",
                       "--profile", str(tmp_path / "prof"), "--out", str(tmp_path / "k.json")])
  first, second = result["rows"]
  # On a CPU at seq_len 32, auto resolves to xla attention (blocked needs >= 64 positions),
  # dots_no_batch, loss chunks of half the sequence, and (a float32 model) float32 logits.
  assert first["model"] == {"attention": "xla", "remat": "dots_no_batch", "scan_unroll": 1,
                            "loss_chunk": 16, "logits": "float32", "dtype": "float32",
                            "param_dtype": "float32", "projections": "flat",
                            "kernel_forward": "kept"}
  assert second["model"]["remat"] == "full" and second["model"]["loss_chunk"] == 8
  cfg = make_model_config("nano", "gpt2", max_len=32)
  for row in (first, second):
    B, L = row["batch"], row["seq_len"]
    assert all(positive_finite(t) for t in row["step_seconds"] + row["matmul_seconds"])
    assert row["tokens_per_sec"] == pytest.approx(B * L / statistics.median(row["step_seconds"]))
    assert row["flops_per_token"] == pytest.approx(flops.flops_per_token(cfg, L))
    assert row["mfu_spec"] is None     # a CPU has no spec peak
    assert row["profile_top"] and all(op["ms_per_step"] >= 0 for op in row["profile_top"])
    # The busy time of each thread that ran the step, then all of them together: at least the
    # busiest one, at most their sum (python's thread, which only waits for the step, left out).
    *lines, anyl = row["profile_busy"]
    busy = [b["busy_ms_per_step"] for b in lines]
    assert busy and min(busy) > 0 and positive_finite(max(busy))
    assert not any(b["line"].startswith("python") for b in lines), lines
    assert anyl["line"] == knobs.ANY_LINE
    assert max(busy) <= anyl["busy_ms_per_step"] <= sum(busy), row
    # The step's wall time by part: every part, the products found, and no more than the time
    # anything ran (the parts share the instants that ops on both threads share).
    by = row["profile_parts_ms_per_step"]
    assert list(by) == list(load_benchmark("parts").PARTS) and by["matmul"] > 0
    assert 0 < sum(by.values()) <= anyl["busy_ms_per_step"] * (1 + 1e-9), by
  assert first["over_first"] == 1.0
  assert second["over_first"] == pytest.approx(second["tokens_per_sec"] / first["tokens_per_sec"])


def test_device_checks_loss_part_on_this_device():
  """The chunked-loss check: float32 chunks equal the plain loss (1e-6) and gradients (1e-5)
  against the host reference; bfloat16 ones, with float32 logits and with bf16 ones, within
  bf16 rounding (1e-2)."""
  checks = load_benchmark("device_checks")
  rows = checks.loss_checks(checks.QUICK)
  assert {(r["dtype"], r["logits"]) for r in rows} == {
      ("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")}
  assert len(rows) >= 6
  for r in rows:
    assert r["check"] == "chunked_loss" and r["chunk"] >= 1
    if r["dtype"] == "float32":
      assert r["loss_rel"] < 1e-6 and r["grad_rel"] < 1e-5, r
    else:
      assert r["loss_rel"] < 1e-2 and r["grad_rel"] < 1e-2, r


def test_profile_busy_time_counts_nested_and_overlapping_events_once():
  union = load_benchmark("knobs")._union_ns  # pylint: disable=protected-access
  assert union([(0, 10)]) == 10
  assert union([(0, 10), (2, 5), (8, 14), (20, 25)]) == 19   # nested, overlapping, apart
  assert union([(0, 4), (4, 6)]) == 6


def test_knobs_param_dtype_variant_and_a_refused_value(tmp_path, capsys):
  """param_dtype=bfloat16 trains with bf16 parameters; a value the model config refuses exits
  2 with one `growlm: error:` line naming it, and writes no result."""
  knobs = load_benchmark("knobs")
  r = knobs.main(["--quick", "--variants", "default; param_dtype=bfloat16", "--out",
                  str(tmp_path / "k.json")])
  f32, row = r["rows"]
  assert row["model"]["param_dtype"] == "bfloat16" and row["variant"] == {
      "param_dtype": "bfloat16"}
  assert positive_finite(row["final_train_loss"])
  # The step's arguments (the state: parameters and both moments, and the batch) shrink by
  # about half: the variant really stores them in bf16.
  arg = lambda x: x["xla_memory"]["argument_size_in_bytes"]
  assert 0.45 < arg(row) / arg(f32) < 0.6, (arg(row), arg(f32))
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    knobs.main(["--quick", "--variants", "param_dtype=int8", "--out", str(tmp_path / "x.json")])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1, err
  assert err[0].startswith("growlm: error: model config: param_dtype='int8'; accepted:"), err
  assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.json.tmp").exists()


def test_knobs_projections_einsum_swaps_the_products_back_for_one_variant(tmp_path):
  """projections=einsum traces the step with the former einsum products (a weight gradient
  contracting batch and position as two dims), computes the same step, and leaves
  model.decoder.project as it was; a value outside flat/einsum is refused by name."""
  import jax
  import jax.numpy as jnp
  from growlm.model import decoder
  knobs = load_benchmark("knobs")
  flat = decoder.project
  cfg = make_model_config("nano", "gpt2", max_len=16)
  p = decoder.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  grad = jax.grad(lambda q: jnp.square(decoder.apply(cfg, q, tokens)).mean())

  def most_contracted(jaxpr):   # over products without batch dims (attention's have them)
    return max(len(c) for eqn in all_eqns(jaxpr) if eqn.primitive.name == "dot_general"
               for (c, _), (batch, _) in [eqn.params["dimension_numbers"]] if not batch)

  assert most_contracted(jax.make_jaxpr(grad)(p).jaxpr) == 1   # traced, so cached, flat
  with knobs._using_projections("einsum"):   # pylint: disable=protected-access
    assert most_contracted(jax.make_jaxpr(grad)(p).jaxpr) == 2
    g_einsum = grad(p)
  assert decoder.project is flat and most_contracted(jax.make_jaxpr(grad)(p).jaxpr) == 1
  for a, b in zip(jax.tree.leaves(grad(p)), jax.tree.leaves(g_einsum)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * (1 + float(jnp.max(jnp.abs(a))))

  r = knobs.main(["--quick", "--variants", "default; projections=einsum", "--out",
                  str(tmp_path / "k.json")])
  first, second = r["rows"]
  assert (first["model"]["projections"], second["model"]["projections"]) == ("flat", "einsum")
  assert second["final_train_loss"] == pytest.approx(first["final_train_loss"], rel=1e-5)
  assert decoder.project is flat
  with pytest.raises(ValueError, match="projections='fused'; accepted: flat, einsum"):
    knobs.parse_variants("projections=fused")


def test_knobs_kernel_forward_rerun_keeps_no_kernel_forward_for_one_variant(monkeypatch):
  """kernel_forward=rerun: under the default remat (dots_no_batch) a grad of a splash model
  traces the kernel's forward once more (it runs again in the backward pass), and the kept
  forwards are back once the variant is done; a value outside kept/rerun is refused by name.
  (Traced, not run: the platform is set to a TPU by hand.)"""
  import jax
  import jax.numpy as jnp
  from growlm.model import attention
  from growlm.model import decoder
  knobs = load_benchmark("knobs")
  monkeypatch.setattr(attention, "_platform", lambda: "tpu")
  cfg = make_model_config("nano", "gpt2", max_len=128)
  p = decoder.init_params(cfg.replace(attention="xla"), jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, cfg.vocab_size)
  splash = cfg.replace(attention="splash")
  grad = jax.grad(lambda q: jnp.square(decoder.apply(splash, q, tokens)).mean())
  kernels = lambda: sum(eqn.primitive.name == "pallas_call"
                        for eqn in all_eqns(jax.make_jaxpr(grad)(p).jaxpr))
  kept, forwards = kernels(), attention.KERNEL_FORWARDS
  with knobs._using_kernel_forward("rerun"):   # pylint: disable=protected-access
    assert kernels() == kept + 1
  assert attention.KERNEL_FORWARDS is forwards and kernels() == kept
  with pytest.raises(ValueError, match="kernel_forward='keep'; accepted: kept, rerun"):
    knobs.parse_variants("kernel_forward=keep")
