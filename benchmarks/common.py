"""What the benchmark scripts share: XLA's buffer sizes of a compiled step, the device
allocator's statistics, and the command-line wrapper that prints a summary and writes the JSON
result atomically.

Importing it puts this checkout's root first on sys.path, so a benchmark measures the growlm
beside it, not an installed one (an editable install of another checkout, say): each script
imports `common` before growlm."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [ROOT]:
  sys.path.insert(0, ROOT)

from growlm.errors import EXIT_USER_ERROR, GrowlmError  # pylint: disable=wrong-import-position


def xla_memory(compiled) -> dict[str, int]:
  """XLA's static buffer sizes for one compiled program (the CPU client keeps no runtime peak).

  `estimate_bytes` = arguments + outputs - aliased (donated) + temporaries. XLA's own
  `peak_memory_in_bytes` is kept as reported, but on CPU it leaves out the temporaries.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends do not implement it
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "alias_size_in_bytes", "temp_size_in_bytes")
         if hasattr(m, k)}
  if hasattr(m, "peak_memory_in_bytes"):
    out["peak_memory_in_bytes"] = int(m.peak_memory_in_bytes)
  if len(out) >= 4:
    out["estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                             - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def device_memory(device) -> dict[str, Any] | str:
  """The runtime allocator's statistics where it keeps them (GPU/TPU; not the CPU client)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats:
    return "unavailable (the jax CPU client keeps no allocator statistics)"
  return {k: int(v) for k, v in stats.items()
          if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def cpus() -> int:
  """CPUs this process may run on (its affinity set where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 0


def add_output_flags(p, default_out: str, quick: dict, what: str = "tiny sizes for tests") -> None:
  """--out (where the JSON result goes) and --quick (the `quick` overrides, for the tests)."""
  p.add_argument("--out", default=default_out, help="where to write the JSON result")
  sets = ", ".join(f"{k}={v}" for k, v in quick.items())
  p.add_argument("--quick", action="store_true", help=f"{what}: sets {sets}")


def apply_quick(args, quick: dict, parser: argparse.ArgumentParser,
                argv: Sequence[str] | None) -> None:
  """Applies the --quick overrides when --quick was given, except to the flags `argv` gives
  itself: `--quick --steps 5` takes 5 steps (and `--quick --steps -3` is refused as -3 is)."""
  if not args.quick:
    return
  unset = object()
  given = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(quick, unset)))
  for k, v in quick.items():
    if getattr(given, k) is unset:
      setattr(args, k, v)


def _check_out(path: str) -> None:
  """--out, before any work: a file path in a directory this user can write."""
  from growlm import fs  # pylint: disable=g-import-not-at-top
  if fs.is_url(path):
    raise GrowlmError(f"--out={path}: the benchmarks write local files; accepted: a local path")
  if os.path.isdir(path):
    raise GrowlmError(f"--out={path} is a directory; accepted: the path of the JSON file to "
                      "write")
  fs.check_writable(path, "--out")


def cli(script: str, argv: Sequence[str] | None, parse_args: Callable, run: Callable,
        summary: Callable[[dict], str]) -> dict[str, Any]:
  """Parses `argv` (default sys.argv[1:]), runs, prints the summary, writes `args.out`
  (through a temporary file, so a stopped run leaves no half-written result). Bad input found
  while running (a knob's value the model config refuses) exits with one `growlm: error:` line."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  rel = os.path.relpath(os.path.abspath(script))
  try:
    _check_out(args.out)
    result = run(args, command=" ".join([os.path.relpath(sys.executable), rel] + argv))
  except GrowlmError as e:
    print(f"growlm: error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  print(summary(result))
  tmp = args.out + ".tmp"
  try:
    out_dir = os.path.dirname(args.out)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(tmp, args.out)
  except OSError as e:   # the disk filled, or --out changed under the run
    if os.path.isfile(tmp):
      os.remove(tmp)
    print(f"growlm: error: --out={args.out}: cannot write the result ({e.strerror or e}); "
          "accepted: a file path in a directory this user can write", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  print(f"wrote {args.out}")
  return result
