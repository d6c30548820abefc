"""Experiment tracking: a no-op `Tracker` and a Weights & Biases backend.

metrics.jsonl stays the source of truth: notebooks read it, and W&B's offline files have no
Python reader. The tracker mirrors what the trainer writes there (per-step train and eval
records, the growth report, the final plots) to W&B, and only on process 0.

The W&B run id is stored in `<workdir>/wandb/growlm_wandb.json` the first time a run dir
logs, so relaunching the same run dir resumes the same W&B run, while a run dir deleted and
recreated at the same path starts a new one. The same file remembers the last step W&B got:
a resumed run replays steps from its checkpoint on, and W&B drops (with a warning per call)
any step below one it has seen, so the tracker skips those itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import netrc
import numbers
import os
import secrets
import time
from typing import Any

import jax

from growlm import curves, fs, transfer
from growlm.config.typed import RunConfig
from growlm.errors import GrowlmError
from growlm.train import metrics

log = logging.getLogger(__name__)

# WANDB_MODE values wandb accepts and what they mean here ('run' and 'dryrun' are old names).
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
             "disabled": "disabled"}
STATE_FILE = "growlm_wandb.json"


def wandb_fields(config: RunConfig) -> dict[str, Any]:
  """config.wandb as a dict (validated when the RunConfig was resolved)."""
  return dataclasses.asdict(config.wandb)   # tags stay a tuple


def resolve_mode(fields: dict[str, Any]) -> tuple[str, str]:
  """(mode, where it came from): WANDB_MODE overrides wandb.mode, so an operator (or the test
  suite) can force offline logging without touching configs."""
  env = os.environ.get("WANDB_MODE", "")
  if env:
    if env not in ENV_MODES:
      raise GrowlmError(f"environment WANDB_MODE={env!r}; accepted: {sorted(ENV_MODES)}")
    return ENV_MODES[env], f"WANDB_MODE={env}"
  return fields["mode"], f"wandb.mode={fields['mode']}"


def netrc_key(hosts: tuple[str, ...]) -> str | None:
  """The API key of the first of `hosts` with one in $NETRC (default ~/.netrc), where `wandb
  login` writes it; a stdlib lookup (also the fallback for a wandb without its own helpers)."""
  path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
  try:
    rc = netrc.netrc(path)
  except (OSError, netrc.NetrcParseError):
    return None
  return next((auth[2] for h in hosts if h and (auth := rc.authenticators(h)) and auth[2]), None)


def _credentials_source() -> str | None:
  """Where wandb will find an API key, or None. Reads environment and files only: no network.

  Follows wandb 0.31's own order (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, then the netrc
  entry of the server's host). The netrc lookup uses wandb's helper because 0.31 defaults to
  https://api.forge.coreweave.com and also accepts the api.wandb.ai entry that `wandb login`
  wrote with older versions.
  """
  key = os.environ.get("WANDB_API_KEY", "")
  if key:
    try:
      from wandb.sdk.lib.wbauth import validation  # pylint: disable=import-outside-toplevel
      problem = validation.check_api_key(key)
    except ImportError:
      problem = None
    if problem:
      raise GrowlmError(f"environment WANDB_API_KEY is malformed ({problem}); accepted: the "
                        "40+ character key from wandb.ai/authorize, or wandb.mode=offline")
    return "WANDB_API_KEY"
  if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
    return "WANDB_IDENTITY_TOKEN_FILE"
  try:
    import wandb  # pylint: disable=import-outside-toplevel
    from wandb.sdk import wandb_setup  # pylint: disable=import-outside-toplevel
    from wandb.sdk.lib import wbauth  # pylint: disable=import-outside-toplevel
  except ImportError:
    return "netrc" if netrc_key(("api.wandb.ai",)) else None
  try:
    host = wandb_setup.singleton().settings.base_url
    return "netrc" if wbauth.read_netrc_auth(host=host) else None
  except wandb.errors.AuthenticationError as e:
    raise GrowlmError(f"the W&B API key in your netrc file is malformed ({e}); accepted: "
                      "`wandb login --relogin`, or wandb.mode=offline") from None


def check_wandb(config: RunConfig) -> None:
  """Fails fast, before a run writes anything, if the config asks for W&B logging that
  cannot work: a bad config.wandb field, no wandb package, or online mode without an API
  key. Checked on every process, so all fail alike instead of process 0 alone."""
  f = wandb_fields(config)
  if not f["enabled"]:
    return
  mode, origin = resolve_mode(f)
  if mode == "disabled":
    return
  try:
    import wandb  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise GrowlmError("config wandb.enabled=True but the wandb package is not installed; "
                      "accepted: pip install wandb, or wandb.enabled=False") from None
  if mode == "online" and _credentials_source() is None:
    raise GrowlmError(f"config wandb.enabled=True with {origin} but no W&B API key (no "
                      "WANDB_API_KEY, no netrc entry from `wandb login`); accepted: set "
                      "WANDB_API_KEY or run `wandb login`, or wandb.mode=offline (or "
                      "WANDB_MODE=offline), or wandb.enabled=False")


def _state_path(workdir: str) -> str:
  return fs.join(workdir, "wandb", STATE_FILE)


def _read_state(workdir: str) -> dict[str, Any] | None:
  try:
    state = json.loads(fs.read_bytes(_state_path(workdir)))
  except (OSError, ValueError):
    return None  # a torn file only costs a new W&B run, never the training run
  return state if isinstance(state, dict) and isinstance(state.get("id"), str) else None


def _write_state(workdir: str, state: dict[str, Any]) -> None:
  path = _state_path(workdir)
  fs.makedirs(fs.dirname(path))
  fs.write_json_atomic(path, state)


def run_id(workdir: str) -> str:
  """The W&B run id of a run dir, created and stored on first use.

  A hash of the absolute path (so two run dirs never share a W&B run) plus a random suffix
  (so a run dir deleted and recreated at the same path does not append to the old run).
  Letters and digits only: W&B ids may not hold ':;,#?/\\''.
  """
  state = _read_state(workdir)
  if state is None:
    where = workdir.rstrip("/") if fs.is_url(workdir) else os.path.realpath(workdir)
    path_hash = hashlib.sha256(where.encode()).hexdigest()[:10]
    state = {"id": path_hash + secrets.token_hex(3), "last_step": None}
    _write_state(workdir, state)
  return state["id"]


def _scalar_metrics(record: dict[str, Any]) -> dict[str, float]:
  # Strings and lists in a record are metadata; W&B would chart lists as histograms.
  return {k: v for k, v in record.items()
          if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


class Tracker:
  """The tracker interface; this base logs nothing (W&B off, or not process 0)."""

  def log(self, record: dict[str, Any]) -> None:
    """One metrics.jsonl record: 'step' plus metrics, or an 'event' such as growth."""

  def log_report(self, report: dict[str, Any]) -> None:
    """The growth preservation report (growlm.grow.report)."""

  def log_image(self, name: str, path: str) -> None:
    """A PNG file, such as the loss curves plot."""

  def log_loss_curve(self, workdir: str) -> None:
    """Plots the run's eval loss against FLOPs (RUN/loss_curve.png) and logs it; the no-op
    tracker draws nothing."""

  def flush(self) -> None:
    """Stores what a relaunch needs to resume the tracker's run (the trainer calls it before
    each checkpoint)."""

  def close(self) -> None:
    """Flushes and ends the run; safe to call twice."""

  def __enter__(self) -> "Tracker":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close()


def _local_dir(workdir: str, rid: str) -> str:
  """Where W&B writes its own files (made): the run dir itself, or for a gs:// run dir WANDB_DIR
  (default transfer.cache_root()/wandb/RUN_ID); the run id in RUN/wandb/ is what resumes."""
  local = workdir if not fs.is_url(workdir) else os.environ.get("WANDB_DIR") or os.path.join(
      transfer.cache_root(), "wandb", rid)
  os.makedirs(local, exist_ok=True)
  return local


AXES = ("tokens", "flops", "flops_with_source", "wall_seconds")   # logged with every record


class WandbTracker(Tracker):
  """Logs to one W&B run per run dir; a relaunch of the run dir resumes it."""

  def __init__(self, workdir: str, *, project: str, name: str, config: dict[str, Any],
               mode: str, entity: str = "", group: str = "", tags: tuple[str, ...] = ()):
    import wandb  # pylint: disable=import-outside-toplevel
    self._wandb = wandb
    self._workdir = workdir
    fs.makedirs(workdir)
    self.run_id = rid = run_id(workdir)  # kept after close, unlike self.run
    local = _local_dir(workdir, rid)
    self._state = _read_state(workdir) or {"id": rid, "last_step": None}
    # silent: no banner or sync hints on stdout. console="off": W&B would otherwise wrap
    # stdout/stderr to mirror them, including every redraw of the tqdm bar.
    # reinit="create_new": a notebook or test may hold several runs; each tracker logs
    # through its own run object, never the global wandb.log.
    self.run = wandb.init(
        project=project, entity=entity or None, name=name, group=group or None,
        tags=list(tags), config=config, dir=local, mode=mode, id=rid, resume="allow",
        reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
    # Loss against compute: tokens, FLOPs and FLOPs with the source's training (equal to FLOPs
    # for a scratch run) and wall-clock are x-axes to choose in any chart; the losses default
    # to FLOPs with source, the axis on which grown and scratch runs of a group compare.
    for axis in AXES:
      self.run.define_metric(axis, summary="max")
    for metric in ("train_loss", "eval_loss/*"):
      self.run.define_metric(metric, step_metric="flops_with_source")
    last = self._state.get("last_step")
    # The smallest step W&B accepts next: online resumption reports where the server's run
    # ends; offline it cannot know, so the step stored with the id decides.
    self._min_step = max(int(self.run.starting_step), 0 if last is None else int(last) + 1)
    self._skipped: list[int] = []
    self._state_dirty, self._state_written = False, time.monotonic()

  def _advance(self, step: int) -> None:
    # Logging the same step again merges into W&B's open history row; a larger one commits it.
    self._min_step = step
    if self._state.get("last_step") is None or step > self._state["last_step"]:
      self._state["last_step"] = step
      self._state_dirty = True
      if (not fs.is_url(self._workdir)
          or time.monotonic() - self._state_written >= metrics.UPLOAD_EVERY_S):
        self.flush()

  def flush(self) -> None:
    """Stores the last logged step with the run id (RUN/wandb/growlm_wandb.json): a local run
    dir at every logged step, a gs:// one at most every metrics.UPLOAD_EVERY_S and here. After a
    crash between two writes, an offline relaunch logs the steps since the stored one a second
    time (online, W&B reports where its run ends and they are skipped); a stop by signal, the
    end of the run and every checkpoint store it."""
    if self._state_dirty:
      _write_state(self._workdir, self._state)
      self._state_dirty, self._state_written = False, time.monotonic()

  def log(self, record: dict[str, Any]) -> None:
    """Events go to the run summary; other records to the history at their step."""
    if self.run is None:
      return
    step = int(record["step"])
    if "event" in record:
      ev = record["event"]
      self.run.summary.update({f"{ev}/{k}": v for k, v in record.items()
                               if k != "event" and v is not None and not isinstance(v, dict)})
      return
    if step < self._min_step:
      self._skipped.append(step)  # already in W&B from before the resume
      return
    self.run.log(_scalar_metrics(record), step=step)
    self._advance(step)

  def log_report(self, report: dict[str, Any]) -> None:
    """Every field (nested ones as growth/dims/d_model) into the summary, and the whole
    report as a two-column table so it reads in one panel; a growth stage's report goes under
    growth_stageJ/ instead."""
    if self.run is None:
      return
    prefix = f"growth_stage{report['stage']}/" if "stage" in report else "growth/"
    flat = _flatten(report, prefix)
    self.run.summary.update({k: v for k, v in flat.items() if v is not None})
    rows = [[k[len(prefix):], v if isinstance(v, str) else json.dumps(v, default=str)]
            for k, v in flat.items()]
    table = self._wandb.Table(columns=["field", "value"], data=rows)
    self.run.log({prefix + "report": table}, step=self._min_step)
    self._advance(self._min_step)

  def log_image(self, name: str, path: str) -> None:
    """Logs the image at the latest step (W&B keeps one version per step)."""
    if self.run is None:
      return
    if not fs.isfile(path):
      raise FileNotFoundError(f"log_image {name!r}: no file {path}")
    with transfer.local_file(path) as local:
      self.run.log({name: self._wandb.Image(local)}, step=self._min_step)
    self._advance(self._min_step)

  def log_loss_curve(self, workdir: str) -> None:
    """Plots the run's eval loss against FLOPs (RUN/loss_curve.png) and logs it."""
    if self.run is None:
      return
    run = curves.load_run(workdir)
    self.log_image("loss_curve", curves.plot_loss_curves([run], fs.join(workdir, "loss_curve.png")))

  def close(self, exit_code: int = 0) -> None:
    """Ends the W&B run; exit_code 1 marks it failed in the UI."""
    if self.run is None:
      return
    self.flush()
    if self._skipped:
      log.info("wandb: skipped %d records at steps %d..%d, logged before the resume",
               len(self._skipped), min(self._skipped), max(self._skipped))
    self.run.finish(exit_code=exit_code)
    self.run = None

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(exit_code=0 if exc_type is None else 1)


def run_tags(config: RunConfig, fields: dict[str, Any]) -> list[str]:
  """The configured tags, then the growth method (or 'scratch') and the model size."""
  if config.init.source:
    method = config.init.plan.name
  else:
    method = "scratch"
  size = f"d{config.model.d_model}-L{config.model.n_layers}"
  out: list[str] = []
  for t in (*fields["tags"], method, size):
    if t not in out:
      out.append(t)
  return out


def make_tracker(config: RunConfig, workdir: str) -> Tracker:
  """The run's tracker: W&B when config.wandb asks for it on process 0, else a no-op."""
  fields = wandb_fields(config)
  if not fields["enabled"] or jax.process_index() != 0:
    return Tracker()
  check_wandb(config)
  mode, _ = resolve_mode(fields)
  if mode == "disabled":
    return Tracker()
  group = fields["group"] or config.sweep_name or config.name
  return WandbTracker(workdir, project=fields["project"], entity=fields["entity"],
                      name=config.name or fs.basename(workdir),
                      group=group, tags=tuple(run_tags(config, fields)),
                      config=config.to_json(), mode=mode)


def log_sweep_results(sweep_dir: str, run_config: dict[str, Any], columns: list[str],
                      rows: list[list[Any]], plot: str | None = None) -> str | None:
  """Logs a sweep's results table (and its loss-curve plot) to one W&B run, SWEEP-results, in
  the group of the sweep's runs, when their config.json (`run_config`, any run's) logs to W&B;
  returns the run's id, or None when it does not. Written from process 0 of the analysis only.
  A relaunched analysis logs again under the same id, as a resumed run."""
  f = dict(run_config.get("wandb") or {})
  if not f.get("enabled"):
    return None
  mode, origin = resolve_mode(f)
  if mode == "disabled":
    return None
  import wandb  # pylint: disable=import-outside-toplevel
  if mode == "online" and _credentials_source() is None:
    raise GrowlmError(f"sweep {sweep_dir}: its runs log to W&B with {origin} but no W&B API key "
                      "is set; accepted: set WANDB_API_KEY or run `wandb login`, or "
                      "WANDB_MODE=offline")
  group = f.get("group") or run_config.get("sweep_name") or run_config.get("name") or "sweep"
  rid = run_id(sweep_dir)   # stored in SWEEP/wandb/, beside W&B's own files
  local = _local_dir(sweep_dir, rid)
  run = wandb.init(project=f.get("project") or "growlm", entity=f.get("entity") or None,
                   name=f"{group}-results", group=group, job_type="analysis", id=rid,
                   resume="allow", dir=local, mode=mode, reinit="create_new",
                   settings=wandb.Settings(silent=True, console="off"))
  try:
    run.log({"results": wandb.Table(columns=columns, data=rows)})
    if plot and fs.isfile(plot):
      with transfer.local_file(plot) as path:
        run.log({"loss_curves": wandb.Image(path)})
  finally:
    run.finish()
  return rid
