"""Prepare: tokenize a source once into token shards (shards.py), in parallel and resumably.

`prepare_tokens(source, tokenizer, out)` lists the source's units (units.py), groups them in
order into parts of about `part_mb` MiB, and tokenizes each part in a worker process into one
shard per split. The grouping depends only on the source and the options, never on the number
of workers, so a prepare stopped at any point and rerun with the same arguments skips the parts
it finished and writes byte-identical shards for the rest. `manifest.json` is written last.

The train split's token stream equals `tokenize_corpus(load_corpus(source, "train"),
tokenizer).tokens` (and the same for eval): prepared and in-memory data hold the same tokens.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import shutil
import sys
from typing import Any

import numpy as np

from growlm.data import shards
from growlm.data import tokenizers
from growlm.data import units
from growlm.errors import GrowlmError
from growlm import fs, transfer
from growlm.fs import read_json_object, write_json_atomic

_TOKENIZERS: dict[str, Any] = {}   # one per worker process


def _tokenizer(spec: str):
  """The tokenizer of `spec`, made once per process."""
  if spec not in _TOKENIZERS:
    _TOKENIZERS[spec] = tokenizers.make_tokenizer(spec)
  return _TOKENIZERS[spec]


def _group(unit_list: list[units.Unit], part_bytes: int) -> list[list[int]]:
  """Consecutive groups of unit indices of at most `part_bytes` (a larger unit is alone)."""
  parts, current, size = [], [], 0
  for i, unit in enumerate(unit_list):
    if current and size + unit.size > part_bytes:
      parts.append(current)
      current, size = [], 0
    current.append(i)
    size += unit.size
  if current:
    parts.append(current)
  return parts


def _sha_lines(lines) -> str:
  """Hex sha256 over the lines, each ended by a newline."""
  digest = hashlib.sha256()
  for line in lines:
    digest.update(line.encode("utf-8") + b"\n")
  return digest.hexdigest()


def _run_part(job: dict) -> dict:
  """Tokenizes one part into its shards (each unit read once, for both splits) and writes its
  marker; returns the marker."""
  tok = _tokenizer(job["tokenizer"])
  eot = np.asarray([tok.eot_id], dtype=np.int64)
  writers = {split: shards.ShardWriter(
      os.path.join(job["out"], shards.shard_name(split, job["part"], job["n_parts"])),
      np.dtype(job["dtype"]), job["record_tokens"]) for split in shards.SPLITS}
  counts = {split: {"n_documents": 0, "n_bytes": 0} for split in shards.SPLITS}
  source_lines: dict[str, list[str]] = {split: [] for split in shards.SPLITS}
  try:
    for unit_fields in job["units"]:
      by_split = units.unit_splits(
          units.Unit(**unit_fields), shards.SPLITS, eval_fraction=job["eval_fraction"],
          text_field=job["text_field"], data_dir=job["data_dir"])
      for split, found in by_split.items():
        docs = [(doc_id, text) for doc_id, text in found if text]
        for (doc_id, text), ids in zip(docs, tok.encode_batch([t for _, t in docs])):
          data = text.encode("utf-8")
          source_lines[split].append(f"{split}\t{doc_id}\t{hashlib.sha256(data).hexdigest()}")
          if ids.size and (int(ids.max()) >= tok.vocab_size or int(ids.min()) < 0):
            raise GrowlmError(f"tokenizer {job['tokenizer']!r} gave ids outside its vocabulary")
          writers[split].add(eot)
          writers[split].add(ids)
          counts[split]["n_documents"] += 1
          counts[split]["n_bytes"] += len(data)
  except BaseException:
    for writer in writers.values():
      writer.abandon()
    raise
  marker: dict[str, Any] = {"part": job["part"], "splits": {}}
  for split, writer in writers.items():
    if writer.n_tokens:
      entry = writer.close()
    else:
      writer.abandon()
      entry = {"file": None, "n_tokens": 0, "n_records": 0, "file_bytes": 0, "sha256": None}
    marker["splits"][split] = {**entry, **counts[split]}
  marker["source_sha256"] = _sha_lines(source_lines["train"] + source_lines["eval"])
  write_json_atomic(os.path.join(job["out"], shards.marker_name(job["part"], job["n_parts"])),
                    marker)
  return marker


def _finished(out: str, part: int, n_parts: int) -> dict | None:
  """The part's marker if the part is complete (marker readable, shards of the recorded size)."""
  path = os.path.join(out, shards.marker_name(part, n_parts))
  if not os.path.isfile(path):
    return None
  try:
    marker = read_json_object(path, "prepare part marker")
    for entry in marker["splits"].values():
      if entry["n_tokens"] and os.path.getsize(os.path.join(out, entry["file"])) != \
          entry["file_bytes"]:
        return None
  except (GrowlmError, KeyError, OSError, TypeError):
    return None
  return marker


def _check_out(out: str, plan: dict) -> dict | None:
  """Refuses an `out` holding anything but this prepare; returns its manifest if complete."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise GrowlmError(f"--out={out} is a file; accepted: a new directory or this prepare's own")
  plan_path = os.path.join(out, shards.PLAN)
  if not os.path.isdir(out) or not os.listdir(out):
    return None
  if not os.path.isfile(plan_path):
    raise GrowlmError(f"--out={out} is a non-empty directory that holds no prepare; accepted: a "
                      "new directory, or one an earlier prepare with the same arguments wrote")
  saved = read_json_object(plan_path, "prepare plan")
  differs = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
  if differs:
    raise GrowlmError(f"--out={out} holds a prepare of other data (differs in "
                      f"{', '.join(differs)}); accepted: a new directory or the same arguments")
  if os.path.isfile(os.path.join(out, shards.MANIFEST)):
    return shards.read_manifest(out)
  return None


def prepare_tokens(source: str, tokenizer: str, out: str, *, eval_fraction: float = 0.05,
                   text_field: str = "text", data_dir: str | None = None, part_mb: float = 64,
                   workers: int = 0, record_tokens: int = shards.RECORD_TOKENS,
                   progress: bool = True) -> dict:
  """Tokenizes `source` into token shards under `out`; returns the manifest.

  Args:
    source: a source spec (units.SOURCE_FORMS).
    tokenizer: "bytes", a tokenizer.json or a SentencePiece .model (tokenizers.make_tokenizer).
    out: the directory to write (created); rerunning on it resumes or is a no-op.
    eval_fraction: share held out as the eval split (units.py says how, per source).
    text_field: the JSONL field, Parquet column or tfds feature holding the text.
    data_dir: tensorflow-datasets data dir for "tfds:" sources.
    part_mb: source MiB per part (one shard per split per part).
    workers: processes (0: one per CPU core, at most the number of parts).
    record_tokens: token ids per array_record record.
    progress: show a progress bar on stderr.

  A gs:// `out` is prepared in a local staging directory (cache_root()/staging/BUCKET/KEY,
  which resumes like any local prepare) and then uploaded, manifest.json last: readers wait for
  it, so a bucket never holds a prepare that looks complete but is not.
  """
  if fs.is_url(out):
    return _prepare_to_url(source, tokenizer, out, eval_fraction=eval_fraction,
                           text_field=text_field, data_dir=data_dir, part_mb=part_mb,
                           workers=workers, record_tokens=record_tokens, progress=progress)
  if not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction < 1.0:
    raise GrowlmError(f"eval_fraction={eval_fraction!r} not accepted (accepted: 0 <= x < 1)")
  if not (isinstance(part_mb, (int, float)) and part_mb > 0):
    raise GrowlmError(f"part_mb={part_mb!r} not accepted (accepted: a number > 0)")
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise GrowlmError(f"workers={workers!r} not accepted (accepted: an int >= 0, 0 = one per core)")
  if not isinstance(text_field, str) or not text_field:
    raise GrowlmError(f"text_field={text_field!r} not accepted (accepted: a field name)")
  tok = _tokenizer(tokenizer)
  unit_list = units.list_units(source, data_dir=data_dir)
  if unit_list:
    units.check_text_field(unit_list[0], text_field, data_dir)
  groups = _group(unit_list, int(part_mb * (1 << 20)))
  tok_info = {"spec": tokenizer, "name": os.path.basename(str(tok.name)), "sha256": tok.sha256,
              "vocab_size": int(tok.vocab_size), "eot_id": int(tok.eot_id)}
  plan = {"format": shards.FORMAT, "format_version": shards.FORMAT_VERSION, "source": source,
          "tokenizer": tok_info, "eval_fraction": float(eval_fraction), "text_field": text_field,
          "dtype": shards.token_dtype(tok.vocab_size).name, "record_tokens": int(record_tokens),
          "part_mb": float(part_mb), "n_parts": len(groups),
          "units_sha256": _sha_lines(f"{u.id}\t{u.size}" for u in unit_list)}
  done = _check_out(out, plan)
  if done is not None:
    return done
  existed = os.path.isdir(out)
  fresh = not existed or not os.listdir(out)
  os.makedirs(out, exist_ok=True)
  try:
    return _prepare_into(out, plan, groups, unit_list, source, tokenizer, eval_fraction,
                         text_field, data_dir, record_tokens, workers, progress)
  except GrowlmError:
    # Bad input found while tokenizing (a file that is not text, no train text): a fresh --out
    # is left as it was, so that the same command runs once the input is fixed. (An interrupted
    # prepare, a full disk: what was written stays, and the same command resumes.)
    if fresh:
      shutil.rmtree(out, ignore_errors=True)
      if existed:
        os.makedirs(out, exist_ok=True)
    raise


def _prepare_into(out: str, plan: dict, groups: list, unit_list: list, source: str,
                  tokenizer: str, eval_fraction: float, text_field: str, data_dir: str | None,
                  record_tokens: int, workers: int, progress: bool) -> dict:
  """prepare_tokens' writing half: the plan, each unfinished part, the manifest."""
  write_json_atomic(os.path.join(out, shards.PLAN), plan)
  for name in os.listdir(out):   # leftovers of an interrupted run are never complete shards
    if name.endswith(".tmp"):
      os.remove(os.path.join(out, name))
  n_parts = len(groups)
  markers = {p: _finished(out, p, n_parts) for p in range(n_parts)}
  jobs = [{"part": p, "n_parts": n_parts, "out": out, "tokenizer": tokenizer,
           "units": [vars(unit_list[i]) for i in group], "eval_fraction": float(eval_fraction),
           "text_field": text_field, "data_dir": data_dir, "dtype": plan["dtype"],
           "record_tokens": int(record_tokens)}
          for p, group in enumerate(groups) if markers[p] is None]
  sizes = {job["part"]: sum(u["size"] for u in job["units"]) for job in jobs}
  _run_jobs(jobs, sizes, workers, progress, skipped=n_parts - len(jobs))
  for p in range(n_parts):
    markers[p] = markers[p] or _finished(out, p, n_parts)
    if markers[p] is None:
      raise GrowlmError(f"prepare part {p} of {out} did not complete; rerun the same command")
  manifest = _manifest(plan, [markers[p] for p in range(n_parts)])
  for split in shards.SPLITS:
    if split == "train" and not manifest["splits"][split]["n_tokens"]:
      raise GrowlmError(f"source {source!r} has no {split} text (eval_fraction={eval_fraction})")
  write_json_atomic(os.path.join(out, shards.MANIFEST), manifest)
  return manifest


def _prepare_to_url(source: str, tokenizer: str, out: str, **kwargs) -> dict:
  fs.check_writable(out, "--out")
  remote = fs.file_sizes(out) if fs.isdir(out) else {}
  if remote and shards.PLAN not in remote:
    raise GrowlmError(f"--out={out} holds objects but no prepare; accepted: a new gs:// prefix, "
                      "or one an earlier prepare with the same arguments wrote")
  stage = os.path.join(transfer.cache_root(), "staging", out.rstrip("/").partition("://")[2])
  manifest = prepare_tokens(source, tokenizer, stage, **kwargs)
  if remote:
    saved = fs.read_json_object(fs.join(out, shards.PLAN), "prepare plan")
    if saved != read_json_object(os.path.join(stage, shards.PLAN), "prepare plan"):
      raise GrowlmError(f"--out={out} holds a prepare of other data; accepted: a new gs:// "
                        "prefix or the same arguments")
  local = fs.file_sizes(stage)
  fs.copy_tree(stage, out, last=shards.MANIFEST,   # parts uploaded by an interrupted run stay
               skip=[r for r, n in local.items() if r != shards.MANIFEST and remote.get(r) == n])
  return manifest


def _run_jobs(jobs: list[dict], sizes: dict, workers: int, progress: bool, skipped: int) -> None:
  """Runs the parts' jobs in `workers` processes (inline for one), with a progress bar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, disable=not progress,
             desc=f"prepare ({skipped} parts already done)" if skipped else "prepare",
             file=sys.stderr)
  workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
  with bar:
    if workers <= 1:
      for job in jobs:
        _run_part(job)
        bar.update(sizes[job["part"]])
      return
    context = multiprocessing.get_context("spawn")   # no fork of a process holding threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = {pool.submit(_run_part, job): job["part"] for job in jobs}
      try:
        for future in concurrent.futures.as_completed(futures):
          future.result()
          bar.update(sizes[futures[future]])
      except BaseException:
        for future in futures:
          future.cancel()
        raise


def _manifest(plan: dict, markers: list[dict]) -> dict:
  """The manifest: the plan, and per split its shards, token/document/byte counts and hashes."""
  splits = {}
  for split in shards.SPLITS:
    entries = [m["splits"][split] for m in markers]
    listed = [{k: e[k] for k in ("file", "n_tokens", "n_records", "file_bytes", "sha256")}
              for e in entries if e["n_tokens"]]
    splits[split] = {
        "n_tokens": sum(e["n_tokens"] for e in entries),
        "n_documents": sum(e["n_documents"] for e in entries),
        "n_bytes": sum(e["n_bytes"] for e in entries),
        "sha256": _sha_lines(e["sha256"] for e in listed),
        "shards": listed,
    }
  source_sha = _sha_lines(m["source_sha256"] for m in markers)
  return {**plan, "splits": splits, "source_sha256": source_sha,
          "sha256": _sha_lines([source_sha, splits["train"]["sha256"], splits["eval"]["sha256"]])}
