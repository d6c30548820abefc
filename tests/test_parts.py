"""benchmarks/parts.py: a profiled train step cut into parts of the model, growlm's and the
PyTorch reference's, and `throughput.py --profile` reporting them side by side."""

from types import SimpleNamespace

import jax
import pytest

from conftest import load_benchmark

from growlm.model import attention as attention_lib
from growlm.model import decoder as model_lib
from growlm.train import loss as loss_lib
from growlm.train import trainer as train_lib

parts = load_benchmark("parts")

STEP = "jit(step)/transpose(jvp(jit(hidden)))/Decoder/while/body/closed_call/checkpoint/layers"


def test_wall_by_part_splits_shared_instants_and_gives_nested_ones_to_the_inner_span():
  # Line 0: a over [0, 10) with b nested in [2, 4); line 1: c over [5, 15).
  # [0, 2) a; [2, 4) b; [4, 5) a; [5, 10) a and c half each; [10, 15) c.
  got = parts.wall_by_part([[(0, 10, "a"), (2, 4, "b")], [(5, 15, "c")]])
  assert got == {"a": 5.5, "b": 2.0, "c": 7.5}
  assert sum(got.values()) == 15   # the union of the spans
  # Spans listed in any order, and one ending where the next starts on the same line.
  assert parts.wall_by_part([[(4, 6, "y"), (0, 4, "x")]]) == {"x": 4.0, "y": 2.0}
  # Nested spans starting together, the inner listed first: the inner one still wins.
  assert parts.wall_by_part([[(0, 3, "in"), (0, 10, "out")]]) == {"in": 3.0, "out": 7.0}


@pytest.mark.parametrize("name,op_name,part", [
    ("ynn_fusion.73", f"{STEP}/mlp/project/dot_general", "matmul"),
    ("copy_bitcast_fusion.1", f"{STEP}/attn/project/transpose", "matmul"),
    ("ynn_fusion.9", f"{STEP}/attn/attend/bkgle,bkse->bkgls/dot_general", "attention"),
    ("transpose_copy_fusion.2", f"{STEP}/attn/attend/transpose", "attention"),
    ("ynn_fusion.2", "jit(step)/transpose(jvp(loss))/while/body/closed_call/project/dot_general",
     "matmul"),
    ("ynn_fusion.1", "jit(step)/jvp(loss)/while/body/closed_call/reduce_max", "loss"),
    ("multiply_add_fusion.13", "jit(step)/optimizer/add", "optimizer"),
    ("ynn_fusion.41", f"{STEP}/attn_norm/reduce_sum", "norms"),
    ("add_bitcast_fusion", "jit(step)/jvp(jit(hidden))/Decoder/final_norm/add", "norms"),
    ("wrapped_broadcast.5", "jit(step)/jvp(jit(hidden))/Decoder/broadcast_in_dim", "scan"),
    ("dynamic-slice_bitcast_fusion.8",
     "jit(step)/transpose(jvp(jit(hidden)))/Decoder/while/body/jit(dynamic_index_in_dim)/"
     "dynamic_slice", "scan"),
    ("multiply_tanh_fusion", f"{STEP}/mlp/tanh", "pointwise"),
    ("add_add_fusion", "jit(step)/jvp(jit(hidden))/Decoder/while/body/closed_call/layers/add",
     "pointwise"),
    ("ynn_fusion.37", "", "other"),
])
def test_jax_part(name, op_name, part):
  assert parts.jax_part(name, op_name) == part


def test_scopes_are_growlms_and_every_one_reaches_the_compiled_step():
  """The scopes parts.py reads are the ones growlm sets, and each survives into the compiled
  train step's metadata (removing a named_scope from growlm fails here)."""
  assert dict(parts.SCOPES) == {model_lib.PROJECT_SCOPE: "matmul",
                                attention_lib.SCOPE: "attention", loss_lib.SCOPE: "loss",
                                train_lib.OPTIMIZER_SCOPE: "optimizer"}
  bench = load_benchmark("throughput")
  from growlm import sharding   # pylint: disable=import-outside-toplevel
  from growlm.train import state as state_lib   # pylint: disable=import-outside-toplevel
  cfg = bench.model_config("gpt2", bench.parse_args(["--quick"]))
  optimizer, schedule = bench.trainer_optimizer("nano", "gpt2")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  with jax.set_mesh(mesh), parts.fresh_metadata():
    abstract, shard = state_lib.state_shardings(cfg, optimizer, mesh, sharding.DEFAULT_RULES)
    batch_shard = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
    _, _, abstract_batch = bench.device_batch(cfg, 2, 32, batch_shard)
    compiled, _ = bench.compile_train_step(cfg, optimizer, schedule, shard, batch_shard,
                                           abstract, abstract_batch)
  table = parts.instructions(compiled.as_text())
  found = {parts.jax_part(name, op_name) for name, (_, op_name) in table.items()}
  assert {"matmul", "attention", "loss", "optimizer", "norms", "pointwise"} <= found


def _plane(name, lines):
  """A stand-in for a jax.profiler plane: lines of (name, [(event name, start, end, stats)])."""
  ev = lambda n, s, e, st: SimpleNamespace(name=n, start_ns=s, duration_ns=e - s, stats=st)
  return SimpleNamespace(name=name, lines=[
      SimpleNamespace(name=ln, events=[ev(*e) for e in events]) for ln, events in lines])


HLO = """
  %fusion.1 = f32[8,8]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/optimizer/mul"}
  %custom-call.2 = f32[8,8]{1,0} custom-call(%a), metadata={op_name="jit(step)/jvp(x)/project/dot"}
"""
TABLE = parts.instructions(HLO)


def test_jax_spans_reads_the_threads_that_ran_the_step_or_the_ops_line_or_the_kernels():
  cpu = _plane("/host:CPU", [
      ("python", [("PjitFunction(jit(step))", 0, 50, [])]),       # it waits: no instruction
      ("tf_XLAEigen/1", [("fusion.1", 0, 10, []), ("ThunkExecutor::Execute", 0, 30, [])]),
      ("tf_XLAEigen/2", [("custom-call.2", 5, 25, [])])])
  assert parts.jax_spans([cpu], TABLE) == [[(0, 10, "optimizer")], [(5, 25, "matmul")]]
  # Another thread runs a step's ops at times (XLA's client thread, the workers then idle).
  inline = _plane("/host:CPU", [
      ("python", [("PjitFunction(jit(step))", 0, 60, [])]),
      ("tf_XLAPjRtCpuClient/7", [("ThunkExecutor::Execute", 0, 50, []), ("fusion.1", 2, 12, []),
                                 ("custom-call.2", 12, 40, [])]),
      ("tf_XLAEigen/1", [("ThunkExecutor::Execute", 60, 61, [])])])
  assert parts.jax_spans([inline], TABLE) == [[(2, 12, "optimizer"), (12, 40, "matmul")]]
  # A thread's work: its instructions and the executor's own events, never its waits.
  events = inline.lines[1].events + [SimpleNamespace(
      name="ThunkExecutor::Execute (wait for completion)", start_ns=70, duration_ns=30)]
  assert parts.cpu_work(events, TABLE) == [(0, 50), (2, 12), (12, 40)]
  assert parts.cpu_work(inline.lines[0].events, TABLE) == []
  gpu_ops = _plane("/device:GPU:0", [
      ("XLA Modules", [("jit_step", 0, 40, [])]),
      ("XLA Ops", [("%fusion.1 = f32[8,8] fusion(%p)", 0, 10, []), ("custom-call.2", 10, 30, [])]),
      ("Stream #13", [("loop_multiply_fusion", 0, 9, [("hlo_op", "fusion.1")])])])
  assert parts.jax_spans([cpu, gpu_ops], TABLE) == [[(0, 10, "optimizer"), (10, 30, "matmul")]]
  # No op line naming instructions: the streams' kernels, by their hlo_op stat.
  gpu_kernels = _plane("/device:GPU:0", [
      ("XLA Ops", [("command_buffer.7", 0, 40, [])]),
      ("Stream #13", [("loop_multiply_fusion", 0, 9, [("hlo_op", "fusion.1")]),
                      ("nvjet_tst_128x256", 9, 30, [("hlo_op", "custom-call.2")]),
                      ("memcpy", 30, 31, [])])])
  assert parts.jax_spans([gpu_kernels], TABLE) == [[(0, 9, "optimizer"), (9, 30, "matmul")]]


@pytest.mark.parametrize("chain,part", [
    (["Optimizer.step#AdamW.step", "aten::_foreach_mul_"], "optimizer"),
    (["aten::_foreach_norm"], "optimizer"),
    (["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"],
     "attention"),
    (["autograd::engine::evaluate_function: ScaledDotProductFlashAttentionForCpuBackward0",
      "aten::empty"], "attention"),
    (["aten::linear", "aten::addmm"], "matmul"),
    (["autograd::engine::evaluate_function: AddmmBackward0", "aten::mm"], "matmul"),
    (["aten::layer_norm", "aten::native_layer_norm"], "norms"),
    (["autograd::engine::evaluate_function: NativeLayerNormBackward0"], "norms"),
    (["aten::cross_entropy_loss", "aten::log_softmax"], "loss"),
    (["aten::gelu"], "pointwise"),
    (["autograd::engine::evaluate_function: GeluBackward0", "aten::gelu_backward"], "pointwise"),
    (["aten::zeros"], "other"),
])
def test_torch_part(chain, part):
  assert parts.torch_part(chain) == part


@pytest.mark.parametrize("kernel,part", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("triton_per_fused_native_layer_norm_0", "norms"),
    ("triton_red_fused__log_softmax_nll_loss_forward_3", "loss"),
    ("void at::native::(anonymous namespace)::fused_adam_kernel<float>", "optimizer"),
    ("triton_poi_fused_gelu_5", "pointwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernel_part(kernel, part):
  assert parts.kernel_part(kernel) == part


def test_throughput_profile_reports_both_sides_by_part(tmp_path):
  """`throughput.py --quick --profile DIR`: growlm's traced step and the reference's, each cut
  into every part; the parts that every gpt2 step has are found on both sides."""
  result = load_benchmark("throughput").main(
      ["--quick", "--styles", "gpt2", "--profile", str(tmp_path / "prof"),
       "--out", str(tmp_path / "bench.json")])
  by = result["rows"][0]["parts_ms_per_step"]
  assert list(by["growlm"]) == list(parts.PARTS)
  assert all(v >= 0 for v in by["growlm"].values())
  for part in ("matmul", "attention", "norms", "loss", "optimizer"):
    assert by["growlm"][part] > 0, part
  assert list((tmp_path / "prof" / "gpt2").rglob("*.xplane.pb"))
  if "skipped" not in result["rows"][0]["torch"]:
    assert list(by["reference"]) == list(parts.PARTS)
    for part in ("matmul", "attention", "norms", "loss", "optimizer"):
      assert by["reference"][part] > 0, part
