"""The data pipeline: prepare throughput, streaming loader throughput, and its GPU headroom.

What one run measures (CPU only; no accelerator is used):
  1. prepare: `growlm.data.prepare_tokens` of the source (the Python stdlib's .py files, or with
     `--source_mb` a byte-capped copy of them read as a `file:` glob) into a fresh temporary
     directory, with `--workers` processes, once with the "bytes" tokenizer and once with a
     byte-level BPE tokenizer.json trained by this run on the first `--bpe_kb` KB of the corpus
     (vocab `--bpe_vocab`; its training is timed apart). Figures per tokenizer: seconds (the
     whole call, starting the spawned workers included), source MB (10^6 bytes: the manifest's
     n_bytes of train + eval), MB/s and tokens/s;
  2. loader: `growlm.data.PreparedIterator` over the BPE-prepared train split at the
     `gpt2-124m` shape (seq_len 1024, global batch 16), `--warmup` batches untimed then
     `--batches` timed: tokens/s = batches x local rows x seq_len / seconds, on one host
     (process_count 1) and as host 0 of `--hosts` (what one host of several reads); the
     in-memory `growlm.data.DataIterator` over the same tokens for comparison;
  3. headroom: the one-host loader rate over GPU_REFERENCE_TOKENS_PER_SEC (what one GPU consumes
     at the gpt2-124m shape), over 8 times that (one host feeding 8 GPUs), and the host-of-8 rate
     over it; and over this machine's own trainer tokens/s when `--throughput_json` exists;
  4. the peak RSS of this process and of the largest prepare worker.

Usage:
  .venv/bin/python benchmarks/data.py                     # whole stdlib, all cores
  .venv/bin/python benchmarks/data.py --quick --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/; this checkout's growlm
from growlm import data


DEFAULT_OUT = os.path.join("runs", "bench", "data.json")
THROUGHPUT_JSON = os.path.join("runs", "bench", "throughput.json")
MB = 1e6
GPU_REFERENCE_TOKENS_PER_SEC = 427_000
GPU_REFERENCE = ("a plain PyTorch GPT-2 trainer on one H100 at the gpt2-124m shape (batch 16 x "
                 "1024, bf16), measured 2026-11-27, quoted from the project's issue")
NOTE = ("CPU estimate: the loader ran on this machine's CPUs with nothing else to do; a GPU "
        "host's trainer shares its CPUs with the loader. headroom = one-host loader tokens/s / "
        "the GPU reference (one GPU per host); headroom_8_gpus = the same rate / (8 x the "
        "reference): one loader process feeding 8 GPUs on one host; headroom_host_of_n = host 0 "
        "of `hosts` (its share of each global batch) / the reference (one GPU per host). Above "
        "1: the loader outruns the GPU.")
QUICK = dict(source_mb=0.4, part_mb=0.1, bpe_kb=100, bpe_vocab=512, seq_len=128, batch=8,
             batches=20, warmup=2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line; --quick overrides the sizes with QUICK."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--source_mb", type=float, default=0.0,
                 help="0: the whole stdlib source; else copy stdlib files up to this many MB "
                 "into a temp dir and prepare them as a file: glob")
  p.add_argument("--workers", type=int, default=0, help="prepare processes (0: all cores)")
  p.add_argument("--part_mb", type=float, default=1.0,
                 help="source MiB per prepare part (parts are what the workers share out)")
  p.add_argument("--bpe_kb", type=int, default=300, help="KB of the corpus the BPE is trained on")
  p.add_argument("--bpe_vocab", type=int, default=4096, help="the BPE tokenizer's vocab size")
  p.add_argument("--seq_len", type=int, default=1024, help="loader sequence length")
  p.add_argument("--batch", type=int, default=16, help="loader global batch")
  p.add_argument("--batches", type=int, default=300, help="timed loader batches")
  p.add_argument("--warmup", type=int, default=20, help="untimed loader batches first")
  p.add_argument("--hosts", type=int, default=8, help="process_count of the per-host run")
  p.add_argument("--read_threads", type=int, default=2, help="PreparedIterator read_threads")
  p.add_argument("--prefetch", type=int, default=4, help="PreparedIterator prefetch")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--throughput_json", default=THROUGHPUT_JSON,
                 help="benchmarks/throughput.py's result, for headroom vs this machine's "
                 "trainer (skipped when missing)")
  common.add_output_flags(p, DEFAULT_OUT, QUICK)
  args = p.parse_args(argv)
  common.apply_quick(args, QUICK, p, argv)
  if args.batches <= 0 or args.warmup < 0 or args.workers < 0 or args.source_mb < 0:
    p.error("--batches must be > 0; --warmup, --workers and --source_mb >= 0")
  if args.batch % args.hosts:
    p.error(f"--batch={args.batch} must be divisible by --hosts={args.hosts}")
  return args


def corpus_sample(max_bytes: int) -> list[tuple[str, str]]:
  """(relative path, text) of the stdlib's .py files in source order whose UTF-8 bytes fit in
  `max_bytes` together (the stdlib source's own byte cap: whole files, one that would overflow
  is passed over)."""
  return data.load_documents("stdlib", "all", max_bytes=max_bytes)


def make_source(args: argparse.Namespace, tmp: str) -> tuple[str, str]:
  """The source spec to prepare and a description: "stdlib", or a file: glob over a copy."""
  if not args.source_mb:
    return "stdlib", "the Python stdlib's .py files (source 'stdlib')"
  folder = os.path.join(tmp, "source")
  os.makedirs(folder)
  files = corpus_sample(int(args.source_mb * MB))
  for rel, text in files:
    with open(os.path.join(folder, rel.replace("/", "__")), "w", encoding="utf-8") as f:
      f.write(text)
  n_bytes = sum(len(t.encode("utf-8")) for _, t in files)
  return (f"file:{folder}/*.py", f"{len(files)} stdlib .py files ({n_bytes / MB:.2f} MB, the "
          f"first that fit in --source_mb={args.source_mb}), copied and read as a file: glob")


def train_bpe(args: argparse.Namespace, path: str) -> dict[str, Any]:
  """Trains a byte-level BPE (`data.train_byte_level_bpe`) on the first `bpe_kb` KB; saves it."""
  texts = [t for _, t in corpus_sample(args.bpe_kb * 1000)]
  t0 = time.perf_counter()
  tok = data.train_byte_level_bpe(texts, args.bpe_vocab)
  seconds = time.perf_counter() - t0
  tok.save(path)
  loaded = data.make_tokenizer(path)
  return {"kind": "byte-level BPE tokenizer.json trained by this run with the `tokenizers` "
                  "library (special tokens <pad>, <|endoftext|>; data.train_byte_level_bpe)",
          "vocab_size_asked": args.bpe_vocab, "vocab_size": int(loaded.vocab_size),
          "trained_on_files": len(texts),
          "trained_on_bytes": sum(len(t.encode("utf-8")) for t in texts),
          "train_seconds": seconds, "sha256": loaded.sha256}


def bench_prepare(source: str, tokenizer: str, out: str, args: argparse.Namespace) -> dict:
  """One timed `prepare_tokens` into a fresh directory; its throughput figures."""
  t0 = time.perf_counter()
  manifest = data.prepare_tokens(source, tokenizer, out, part_mb=args.part_mb,
                                 workers=args.workers, progress=False)
  seconds = time.perf_counter() - t0
  splits = manifest["splits"]
  source_bytes = sum(s["n_bytes"] for s in splits.values())
  tokens = sum(s["n_tokens"] for s in splits.values())
  n_parts = manifest["n_parts"]
  return {"seconds": seconds, "n_parts": n_parts,
          "workers_used": min(args.workers or os.cpu_count() or 1, n_parts),
          "source_bytes": source_bytes, "source_mb": source_bytes / MB,
          "documents": sum(s["n_documents"] for s in splits.values()),
          "tokens": tokens, "train_tokens": splits["train"]["n_tokens"],
          "eval_tokens": splits["eval"]["n_tokens"],
          "shard_bytes": sum(sh["file_bytes"] for s in splits.values() for sh in s["shards"]),
          "dtype": manifest["dtype"], "bytes_per_token": source_bytes / tokens,
          "mb_per_sec": source_bytes / MB / seconds, "tokens_per_sec": tokens / seconds}


def time_loader(make: Callable[[], Any], batches: int, warmup: int) -> dict[str, Any]:
  """Builds an iterator, draws `warmup` batches, then times `batches`; tokens/s of inputs.

  A prefetching iterator may hold up to `prefetch` batches read during the warmup, so the first
  timed ones can come for free: negligible against the default 300 timed batches.
  """
  t0 = time.perf_counter()
  it = make()
  build_s = time.perf_counter() - t0
  for _ in range(warmup):
    next(it)
  rows = seq_len = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    rows, seq_len = next(it)["inputs"].shape
  seconds = time.perf_counter() - t0
  del it
  tokens = batches * rows * seq_len
  return {"build_seconds": build_s, "warmup_batches": warmup, "batches": batches,
          "local_batch": int(rows), "seq_len": int(seq_len), "tokens": tokens,
          "seconds": seconds, "tokens_per_sec": tokens / seconds,
          "batches_per_sec": batches / seconds}


def bench_loaders(prepared: str, tokenizer: str, args: argparse.Namespace) -> dict[str, Any]:
  """The streaming loader on one host and as host 0 of `hosts`; the in-memory one."""
  tok = data.make_tokenizer(tokenizer)
  spec = "prepared:" + prepared
  L, B = args.seq_len, args.batch

  def streaming(process_index: int, process_count: int) -> Callable[[], Any]:
    """A factory of the PreparedIterator for this layout."""
    return lambda: data.PreparedIterator(
        data.open_split(spec, "train", tok), L, B, args.seed, process_index=process_index,
        process_count=process_count, read_threads=args.read_threads, prefetch=args.prefetch)

  out = {"tokenizer": "bpe (the prepare's BPE split)", "seq_len": L, "global_batch": B,
         "read_threads": args.read_threads, "prefetch": args.prefetch,
         "one_host": {"process_index": 0, "process_count": 1,
                      **time_loader(streaming(0, 1), args.batches, args.warmup)},
         "host_of_n": {"process_index": 0, "process_count": args.hosts,
                       **time_loader(streaming(0, args.hosts), args.batches, args.warmup)}}
  t0 = time.perf_counter()
  stream = data.token_stream(spec, "train", tok, eval_fraction=0.05, max_bytes=0, data_dir=None)
  load_s = time.perf_counter() - t0
  out["in_memory"] = {"process_index": 0, "process_count": 1, "load_seconds": load_s,
                      "stream_tokens": int(stream.tokens.size), **time_loader(
                          lambda: data.DataIterator(stream, L, B, args.seed),
                          args.batches, args.warmup)}
  return out


def trainer_headroom(path: str, loader_rate: float) -> dict[str, Any] | None:
  """The loader rate over each train tokens/s row of benchmarks/throughput.py's JSON; None when
  the file is missing or unreadable."""
  try:
    with open(path) as f:
      result = json.load(f)
    rows = [{"style": r["style"], "batch": r["batch"], "seq_len": r["seq_len"],
             "train_tokens_per_sec": float(r["train"]["tokens_per_sec"])}
            for r in result["rows"]]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  for r in rows:
    r["headroom"] = loader_rate / r["train_tokens_per_sec"]
  return {"file": path, "preset": result.get("settings", {}).get("preset"),
          "device_kind": result.get("machine", {}).get("device_kind"), "rows": rows}


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  """Runs the benchmark and returns the result dict (also what is written as JSON)."""
  started = time.perf_counter()
  tmp = tempfile.mkdtemp(prefix="growlm-bench-data-")
  try:
    source, source_desc = make_source(args, tmp)
    bpe_path = os.path.join(tmp, "bpe-tokenizer.json")
    bpe = train_bpe(args, bpe_path)
    prepare = {"bytes": bench_prepare(source, "bytes", os.path.join(tmp, "prep-bytes"), args),
               "bpe": bench_prepare(source, bpe_path, os.path.join(tmp, "prep-bpe"), args)}
    loader = bench_loaders(os.path.join(tmp, "prep-bpe"), bpe_path, args)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  ref = GPU_REFERENCE_TOKENS_PER_SEC
  one = loader["one_host"]["tokens_per_sec"]
  per_host = loader["host_of_n"]["tokens_per_sec"]
  result = {
      "benchmark": "growlm data pipeline",
      "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": bool(args.quick),
      "settings": {k: getattr(args, k) for k in (
          "source_mb", "workers", "part_mb", "bpe_kb", "bpe_vocab", "seq_len", "batch",
          "batches", "warmup", "hosts", "read_threads", "prefetch", "seed")},
      "machine": {"cpus": common.cpus(), "os_cpu_count": os.cpu_count(),
                  "processor": platform.processor() or platform.machine(),
                  "python": platform.python_version()},
      "source": source if not args.source_mb else "file:<temp copy>/*.py",
      "source_description": source_desc,
      "mb_definition": "MB = 10^6 bytes of UTF-8 source text (manifest n_bytes, train + eval)",
      "tokenizers": {"bytes": {"kind": "UTF-8 bytes (growlm 'bytes')", "vocab_size": 258},
                     "bpe": bpe},
      "prepare": prepare,
      "loader": loader,
      "gpu_reference_tokens_per_sec": ref,
      "gpu_reference": GPU_REFERENCE,
      "loader_tokens_per_sec": one,
      "loader_tokens_per_sec_per_host_of_n": per_host,
      "headroom": one / ref,
      "headroom_8_gpus": one / (8 * ref),
      "headroom_host_of_n": per_host / ref,
      "note": NOTE.replace("`hosts`", str(args.hosts)),
      "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "largest_worker_max_rss_bytes":
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
      "rss_note": ("ru_maxrss; a spawned worker's peak counts from its fork of this process, so "
                   "largest_worker_max_rss_bytes is an upper bound of the worker's own"),
      "wall_seconds": time.perf_counter() - started,
  }
  trainer = trainer_headroom(args.throughput_json, one)
  if trainer is not None:
    result["this_machine_trainer"] = trainer
  return result


def _summary(r: dict[str, Any]) -> str:
  """A few lines with the figures."""
  s, ld = r["settings"], r["loader"]
  mtok = lambda x: f"{x / 1e6:.2f} M tokens/s"
  lines = [f"data pipeline: {r['source_description']}; {r['machine']['cpus']} CPUs"]
  for name, p in r["prepare"].items():
    extra = ""
    if name == "bpe":
      t = r["tokenizers"]["bpe"]
      extra = (f" (vocab {t['vocab_size']}, trained on {t['trained_on_bytes'] / 1e3:.0f} KB "
               f"in {t['train_seconds']:.1f} s)")
    lines.append(f"  prepare {name}{extra}: {p['source_mb']:.2f} MB, {p['tokens']:,} tokens in "
                 f"{p['seconds']:.2f} s ({p['workers_used']} workers, {p['n_parts']} parts): "
                 f"{p['mb_per_sec']:.2f} MB/s, {mtok(p['tokens_per_sec'])}")
  lines.append(
      f"  loader {s['batch']} x {s['seq_len']}, {s['batches']} batches: PreparedIterator one "
      f"host {mtok(ld['one_host']['tokens_per_sec'])}; host 0 of {s['hosts']} "
      f"({ld['host_of_n']['local_batch']} rows) {mtok(ld['host_of_n']['tokens_per_sec'])}; "
      f"in-memory DataIterator {mtok(ld['in_memory']['tokens_per_sec'])}")
  lines.append(
      f"  vs {r['gpu_reference_tokens_per_sec']:,} tokens/s per GPU (PyTorch GPT-2 124M, H100): "
      f"headroom {r['headroom']:.2f}x (1 GPU/host), {r['headroom_8_gpus']:.2f}x (8 GPUs/host), "
      f"{r['headroom_host_of_n']:.2f}x (host of {s['hosts']}); CPU estimate")
  for row in r.get("this_machine_trainer", {}).get("rows", []):
    lines.append(f"  vs this machine's {row['style']} trainer "
                 f"({row['train_tokens_per_sec']:,.0f} tokens/s): headroom {row['headroom']:.1f}x")
  lines.append(f"  peak RSS {r['process_max_rss_bytes'] / 2**20:.0f} MiB (largest prepare worker "
               f"{r['largest_worker_max_rss_bytes'] / 2**20:.0f} MiB); wall "
               f"{r['wall_seconds']:.1f} s")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; `argv` (without the program name) defaults to sys.argv[1:]."""
  return common.cli(__file__, argv, parse_args, run, _summary)


if __name__ == "__main__":   # prepare's workers are spawned: they re-import this file
  main()
