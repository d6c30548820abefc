"""benchmarks/gpu_traffic.py: the kernels of a compiled step and the bytes each reads and writes
(loops counted per iteration, slices and in-place updates by what they touch), and its one error
line where XLA's CUDA plugin is not installed. The GPU compile itself needs `make gpu-aot`; the
HLO it reads is checked here on hand-written and CPU-compiled modules."""

import jax
import jax.numpy as jnp
import pytest

from conftest import load_benchmark

traffic = load_benchmark("gpu_traffic")

# A loop of 6 iterations over a stacked [6, 256, 128] f32 buffer: each iteration slices one
# [256, 128] layer (131,072 bytes), multiplies it into a [256, 128] carry, and writes its result
# in place into a [6, 256, 128] output (131,072 bytes); the entry then reads 8 logits of a
# [4096, 512] f32 tensor through a bitcast and a gather, and adds two [256, 128] arrays.
HLO = """HloModule m

%fused_slice (p0: f32[6,256,128], p1: s32[]) -> f32[256,128] {
  %p0 = f32[6,256,128]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,256,128]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,256,128}
  ROOT %b = f32[256,128]{1,0} bitcast(%ds)
}

%fused_update (q0: f32[6,256,128], q1: f32[256,128], q2: s32[]) -> f32[6,256,128] {
  %q1 = f32[256,128]{1,0} parameter(1)
  %q0 = f32[6,256,128]{2,1,0} parameter(0)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %u = f32[1,256,128]{2,1,0} bitcast(%q1)
  ROOT %dus = f32[6,256,128]{2,1,0} dynamic-update-slice(%q0, %u, %q2, %z, %z)
}

%fused_gather (g0: f32[4096,512], g1: s32[8,2]) -> f32[8] {
  %g0 = f32[4096,512]{1,0} parameter(0)
  %g1 = s32[8,2]{1,0} parameter(1)
  %bc = f32[4096,512]{1,0} bitcast(%g0)
  ROOT %ga = f32[8]{0} gather(%bc, %g1), offset_dims={}, collapsed_slice_dims={0,1}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
}

%body (t: (s32[], f32[256,128], f32[6,256,128], f32[6,256,128])) -> (s32[], f32[256,128], f32[6,256,128], f32[6,256,128]) {
  %t = (s32[], f32[256,128]{1,0}, f32[6,256,128]{2,1,0}, f32[6,256,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = f32[256,128]{1,0} get-tuple-element(%t), index=1
  %w = f32[6,256,128]{2,1,0} get-tuple-element(%t), index=2
  %o = f32[6,256,128]{2,1,0} get-tuple-element(%t), index=3
  %s = f32[256,128]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(f)/while/body/jit(dynamic_index_in_dim)/dynamic_slice"}
  %m = f32[256,128]{1,0} multiply(%c, %s), metadata={op_name="jit(f)/while/body/layers/mlp/mul"}
  %n = f32[6,256,128]{2,1,0} fusion(%o, %m, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %r = (s32[], f32[256,128]{1,0}, f32[6,256,128]{2,1,0}, f32[6,256,128]{2,1,0}) tuple(%j, %m, %w, %n)
}

%cond (t: (s32[], f32[256,128], f32[6,256,128], f32[6,256,128])) -> pred[] {
  %t = (s32[], f32[256,128]{1,0}, f32[6,256,128]{2,1,0}, f32[6,256,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %six = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %six), direction=LT
}

ENTRY %main (x: f32[256,128], w: f32[6,256,128], o: f32[6,256,128], l: f32[4096,512], k: s32[8,2]) -> f32[256,128] {
  %x = f32[256,128]{1,0} parameter(0)
  %w = f32[6,256,128]{2,1,0} parameter(1)
  %o = f32[6,256,128]{2,1,0} parameter(2)
  %l = f32[4096,512]{1,0} parameter(3)
  %k = s32[8,2]{1,0} parameter(4)
  %zero = s32[] constant(0)
  %init = (s32[], f32[256,128]{1,0}, f32[6,256,128]{2,1,0}, f32[6,256,128]{2,1,0}) tuple(%zero, %x, %w, %o)
  %loop = (s32[], f32[256,128]{1,0}, f32[6,256,128]{2,1,0}, f32[6,256,128]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %g = f32[8]{0} fusion(%l, %k), kind=kLoop, calls=%fused_gather, metadata={op_name="jit(f)/loss/gather"}
  %y = f32[256,128]{1,0} get-tuple-element(%loop), index=1
  ROOT %sum = f32[256,128]{1,0} add(%y, %x), metadata={op_name="jit(f)/Decoder/add"}
}
"""
LAYER = 256 * 128 * 4


def test_kernels_of_a_hand_written_module():
  ks = {k.name: k for k in traffic.kernels(HLO)}
  assert set(ks) == {"s", "m", "n", "j", "g", "sum"}          # no parameters, tuples, loops
  assert ks["s"].launches == ks["m"].launches == ks["n"].launches == ks["j"].launches == 6
  assert ks["g"].launches == ks["sum"].launches == 1
  assert (ks["s"].read, ks["s"].written) == (LAYER + 4, LAYER)   # one layer, and its index
  assert (ks["m"].read, ks["m"].written) == (2 * LAYER, LAYER)
  assert (ks["n"].read, ks["n"].written) == (LAYER + 4, LAYER)   # in place: the update only
  assert (ks["g"].read, ks["g"].written) == (8 * 4 + 8 * 2 * 4, 8 * 4)   # 8 gathered logits
  assert ks["sum"].bytes == 3 * LAYER
  assert ks["m"].part == "pointwise" and ks["g"].part == "loss" and ks["s"].part == "scan"
  parted = traffic.by_part(list(ks.values()))
  assert parted["pointwise"]["launches"] == 7
  assert parted["pointwise"]["gb"] == pytest.approx((6 * 3 * LAYER + 3 * LAYER) / 1e9)


# The loss's pattern with bf16 logits: a fusion gathers 8 target logits through a convert of
# the [4096, 512] bf16 logits to float32 (it reads the 8, not the tensor); another converts and
# also negates the whole tensor (it reads all of it).
CONVERTED = """HloModule c

%gathered (g0: bf16[4096,512], g1: s32[8,2]) -> f32[8] {
  %g0 = bf16[4096,512]{1,0} parameter(0)
  %g1 = s32[8,2]{1,0} parameter(1)
  %c = f32[4096,512]{1,0} convert(%g0)
  %bc = f32[4096,512]{1,0} bitcast(%c)
  ROOT %ga = f32[8]{0} gather(%bc, %g1), offset_dims={}, collapsed_slice_dims={0,1}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
}

%both (h0: bf16[4096,512], h1: s32[8,2]) -> (f32[8], f32[4096,512]) {
  %h0 = bf16[4096,512]{1,0} parameter(0)
  %h1 = s32[8,2]{1,0} parameter(1)
  %c = f32[4096,512]{1,0} convert(%h0)
  %ga = f32[8]{0} gather(%c, %h1), offset_dims={}, collapsed_slice_dims={0,1}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
  %n = f32[4096,512]{1,0} negate(%c)
  ROOT %t = (f32[8]{0}, f32[4096,512]{1,0}) tuple(%ga, %n)
}

ENTRY %main (l: bf16[4096,512], k: s32[8,2]) -> (f32[8], (f32[8], f32[4096,512])) {
  %l = bf16[4096,512]{1,0} parameter(0)
  %k = s32[8,2]{1,0} parameter(1)
  %a = f32[8]{0} fusion(%l, %k), kind=kLoop, calls=%gathered, metadata={op_name="jit(f)/loss/gather"}
  %b = (f32[8]{0}, f32[4096,512]{1,0}) fusion(%l, %k), kind=kLoop, calls=%both, metadata={op_name="jit(f)/loss/neg"}
  ROOT %r = (f32[8]{0}, (f32[8]{0}, f32[4096,512]{1,0})) tuple(%a, %b)
}
"""


def test_a_fused_convert_reads_what_its_users_read():
  ks = {k.name: k for k in traffic.kernels(CONVERTED)}
  assert (ks["a"].read, ks["a"].written) == (8 * 4 + 8 * 2 * 4, 8 * 4)
  assert (ks["b"].read, ks["b"].written) == (4096 * 512 * 2 + 8 * 2 * 4, 8 * 4 + 4096 * 512 * 4)


def test_kernels_of_a_cpu_compiled_scan():
  """XLA's own text (here the CPU's): each kernel of the scan's body is launched once per layer,
  and what the step reads of the stacked weights is one layer per iteration, not the stack."""
  ws = jnp.ones((5, 64, 64), jnp.float32)
  x = jnp.ones((8, 64), jnp.float32)
  f = jax.jit(lambda ws, x: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0])
  ks = traffic.kernels(f.lower(ws, x).compile().as_text())
  looped = [k for k in ks if k.launches == 5]
  assert looped, [(k.name, k.launches) for k in ks]
  assert all(k.launches in (1, 5) for k in ks)
  weights_read = sum(k.launches * k.read for k in ks if k.launches == 5)
  assert weights_read < 5 * (ws.size * 4)          # not the whole stack every iteration
  assert weights_read >= 5 * 64 * 64 * 4           # but each layer's weights once


def test_no_plugin_is_one_error_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("GROWLM_CUDA_AOT", str(tmp_path))
  with pytest.raises(SystemExit) as e:
    traffic.main(["--out", str(tmp_path / "out.json")])
  assert e.value.code == 2
  message = capsys.readouterr().err
  assert message.startswith("growlm: error: XLA's CUDA plugin is not at ")
  assert "make gpu-aot" in message and message.count("\n") == 1
  assert not (tmp_path / "out.json").exists()


def test_target_config_names_the_gpu_and_its_memory():
  text = traffic.target_config("h200")
  assert 'device_description_str: "NVIDIA H200"' in text
  assert f"device_memory_size: {traffic.TARGETS['h200']['memory']}" in text
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text


def test_cuda_plugin_pins_are_the_ones_jax_asks_for():
  """constraints/cpu.txt pins XLA's CUDA plugin (`make gpu-aot`) at the version the installed
  jax's [cuda12] extra names, and its PJRT half at the same version."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  from packaging.requirements import Requirement  # pylint: disable=import-outside-toplevel
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  pins = dict(line.split("==") for line in (REPO / "constraints" / "cpu.txt").read_text()
              .splitlines() if "==" in line and not line.startswith("#"))
  wanted = [Requirement(r) for r in importlib.metadata.requires("jax")
            if r.startswith("jax-cuda12-plugin") and r.endswith('extra == "cuda12"')]
  assert len(wanted) == 1, wanted
  assert wanted[0].specifier.contains(pins["jax-cuda12-plugin"]), wanted[0]
  assert pins["jax-cuda12-pjrt"] == pins["jax-cuda12-plugin"]
  assert "nvidia-cudnn-cu12" in pins


def test_a_compiled_train_step_read_by_part():
  """The tool's pipeline on this machine's own CPU device: `aot.compile_on` (the code path of
  --compile_for) keeps the step's HLO, and its kernels fall into the model's parts: the scan's
  kernels launched once per layer (or a multiple, in a loop inside the layer), the optimizer's
  once per step, the products' traffic at least the weights they read."""
  from conftest import run_config  # pylint: disable=import-outside-toplevel
  from growlm.config.typed import resolve  # pylint: disable=import-outside-toplevel
  from growlm.train import aot  # pylint: disable=import-outside-toplevel
  config = resolve(run_config(**{"model.n_layers": 3}))
  r = aot.compile_on(config, jax.devices()[:1], "cpu", "cpu", None, keep_hlo=True)
  stage = r["stages"][0]
  ks = traffic.kernels(stage["hlo"])
  parted = traffic.by_part(ks)
  assert {"matmul", "loss", "optimizer"} <= set(parted), parted
  layers = [k for k in ks if "Decoder/while/body/" in k.op_name]
  assert layers and all(k.launches % 3 == 0 for k in layers)   # inside the scan over layers
  assert any(k.launches == 3 for k in layers if k.part == "matmul")
  assert all(k.launches == 1 for k in ks if k.part == "optimizer")
  assert stage["params"] > 0
  assert parted["matmul"]["gb"] * 1e9 > 4 * stage["params"]   # float32 weights, read at least once


def test_growth_report_counts_a_compiled_growth_against_its_floor():
  """--growth's figures from a growth compiled for this CPU (the same function a GPU target
  compiles): the floor is the source's params read and the target's written, and a growth
  moves at least that (every target byte is written, every source byte read)."""
  import jax  # pylint: disable=import-outside-toplevel
  from growlm.model import decoder as model_lib  # pylint: disable=import-outside-toplevel
  g = traffic.growth_report(jax.devices("cpu")[0], "gpt2", preset="quick", top=3)
  src, dst = load_benchmark("growth").PRESETS["quick"]("gpt2")
  size = lambda cfg: sum(a.size * a.dtype.itemsize
                         for a in jax.tree.leaves(model_lib.abstract_params(cfg)[0]))
  assert g["floor_gb"] == pytest.approx((size(src) + size(dst)) / 1e9, rel=1e-12)
  assert (g["width"], g["depth"]) == ("mean_fill", "identity")
  assert g["launches"] > 0 and len(g["top"]) == 3
  assert g["over_floor"] == pytest.approx(g["gb"] / g["floor_gb"], rel=1e-12)
  assert g["gb"] >= g["floor_gb"]
