"""Test setup: 8 fake CPU devices for sharding tests and fast XLA compiles (must be set before
JAX is imported)."""

import os
import tempfile

DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
# The tests check numbers and behaviour, not the speed of the compiled code, and most of their
# time is XLA compiling small programs: LLVM without its optimisation passes and XLA's loop
# emitters for fusions compile about twice as fast (docs/design.md, section 8, has the
# measurement). Every process of the suite, and every process it starts, compiles this way (see
# user_env), so results compared across processes come from the same kind of code. A value the
# environment already gives either flag is kept.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# XLA's own defaults for those two, as compiler_options: for a test whose claim is about the code
# a user's compile gives (two programs agreeing bit for bit), not only about values.
XLA_DEFAULT_COMPILE = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


_given = os.environ.get("XLA_FLAGS", "").split()
_named = {g.split("=")[0] for g in _given}
os.environ["XLA_FLAGS"] = " ".join(
    _given + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _named] + [DEVICES_FLAG])
os.environ.setdefault("WANDB_MODE", "offline")
# One JAX compilation cache for the suite and every process it starts: the same tiny configs
# compile in dozens of tests and subprocesses; the first compile fills it, later ones read it
# (keys hold the jax version, the program and the devices, so a stale entry is never used).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"growlm-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.extend  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position

from pathlib import Path  # noqa: E402  pylint: disable=wrong-import-position

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def user_env(**extra: str) -> dict[str, str]:
  """The environment for a command run as a user would: this process's, less the suite's 8 fake
  CPU devices (one CPU device, or what the command's own flags ask for), with `extra`. The fast
  compile flags stay."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.update(extra)
  return env


@pytest.fixture(scope="session")
def n_devices():
  return jax.device_count()


def run_config(**overrides):
  """The tiny `runlocal` training config on one device, with dotted-path overrides."""
  import sys  # pylint: disable=g-import-not-at-top
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from configs import default  # pylint: disable=g-import-not-at-top
  from growlm.config import files  # pylint: disable=g-import-not-at-top
  c = default.get_config("size=nano,runlocal")
  c.log.progress_bar = False
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  c.checkpoint.async_save = False
  for path, value in overrides.items():
    files.set_field(c, path, value, what="test")
  return c


def byte_level_bpe(texts, vocab_size: int):
  """A small byte-level BPE `tokenizers.Tokenizer` (special tokens <pad>, <|endoftext|>) trained
  on `texts`, as GPT-2's tokenizer.json is built; for tests of the HF tokenizer path."""
  from growlm.data import train_byte_level_bpe  # pylint: disable=g-import-not-at-top
  return train_byte_level_bpe(texts, vocab_size)


def load_benchmark(name: str):
  """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"growlm_bench_{name}",
                                                REPO / "benchmarks" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def all_eqns(jaxpr):
  """Every equation of `jaxpr` and, depth first, of the jaxprs inside its equations (scan and
  remat bodies, custom rules, pjit calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from all_eqns(sub)


def positive_finite(x) -> bool:
  """A real number above zero (what every measured time and rate must be)."""
  import math  # pylint: disable=g-import-not-at-top
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# The longest files first (by their time in a whole run, 2026-11-30): `make test` gives each of
# its two workers one file at a time in this order (--no-loadscope-reorder), and a long file
# started last would leave the other worker idle at the end.
_LONG_FILES = ("test_aot.py", "test_train.py", "test_readme.py", "test_grow.py",
               "test_reliability.py", "test_model.py", "test_launch_e2e.py",
               "test_grow_training.py", "test_gcs_runs.py", "test_stages.py", "test_sweep.py",
               "test_hf.py", "test_grow_assemble.py", "test_loss.py", "test_knobs_checks.py",
               "test_sample.py", "test_benchmark.py", "test_bad_inputs.py", "test_attention.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(_LONG_FILES)))


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py), with this process's environment (and so
  every subprocess's) pointed at it; `gcs.bucket()` returns a fresh gs://BUCKET."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  emu = gcs_emulator.Emulator()
  saved = {k: os.environ.get(k) for k in emu.env()}
  os.environ.update(emu.env())
  yield emu
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  emu.stop()


def one_line_naming(e, *says: str) -> str:
  """A refusal's message (`e`: a pytest.ExceptionInfo), after checking it is one line and names
  each of `says`."""
  msg = str(e.value)
  assert "\n" not in msg, msg
  for s in says:
    assert s in msg, (s, msg)
  return msg
