"""The tracker: W&B offline runs in a tmp run dir, resumption, the no-op path, fail-fast checks.

W&B is only ever used offline here (no network); conftest sets WANDB_MODE=offline.
"""

import glob
import json
import os
import time

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from growlm.config import defaults as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from growlm.config.typed import resolve  # noqa: E402  pylint: disable=wrong-import-position
from growlm.train import metrics  # noqa: E402  pylint: disable=wrong-import-position
from growlm.train import tracking  # noqa: E402  pylint: disable=wrong-import-position
from growlm.errors import GrowlmError  # noqa: E402  pylint: disable=wrong-import-position


def _config(**wandb):
  c = config_lib.base_config("nano")
  c.name = "unit"
  c.wandb.enabled = True
  c.wandb.mode = "offline"
  for k, v in wandb.items():
    c.wandb[k] = v
  return c


def _records(steps):
  out = []
  for s in steps:
    out.append({"step": s, "tokens": 64 * s, "flops": 1e6 * s, "train_loss": 5.0 - 0.1 * s,
                "grad_norm": 1.0, "lr": 1e-3})
    if s % 2 == 0:
      out.append({"step": s, "tokens": 64 * s, "eval_loss/heldout": 5.5 - 0.1 * s,
                  "eval_bpb/heldout": 8.0})
  return out


REPORT = {"method": "tile+identity", "exact_expected": True, "max_abs_logit_diff": 1e-6,
          "kl_src_dst": 0.0, "loss_src": 4.2, "loss_dst": 4.2, "n_tokens": 512,
          "plan": {"width": "tile", "depth": "identity", "new_layer_indices": []},
          "dims": {"d_model": [64, 128]}, "norm_eps": [1e-6, 1e-6], "source": "/x/run"}


def _png(path):
  fig, ax = plt.subplots(figsize=(2, 2))
  ax.plot([0, 1, 2], [3.0, 2.0, 1.5])
  fig.savefig(path)
  plt.close(fig)
  return str(path)


def _wandb_files(workdir):
  return glob.glob(os.path.join(str(workdir), "wandb", "offline-run-*", "run-*.wandb"))


def test_offline_run_logs_records_report_and_image(tmp_path):
  workdir = tmp_path / "run"
  tracker = tracking.make_tracker(resolve(_config(tags=("mine",))), str(workdir))
  assert isinstance(tracker, tracking.WandbTracker)
  assert tracker.run.id == tracker.run_id == tracking.run_id(str(workdir))
  assert list(tracker.run.tags) == ["mine", "scratch", "d64-L2"]
  assert tracker.run.group == "unit"
  assert tracker.run.config["data"]["seq_len"] == 128  # the full resolved config
  growth = {"step": 0, "tokens": 0, "event": "growth", "method": "tile+identity",
            "loss_dst": 4.2, "norm_eps": [1e-6, 1e-6], "exact_expected": None}
  tracker.log(growth)
  tracker.log_report(REPORT)
  tracker.log_report({**REPORT, "stage": 2, "loss_dst": 3.9})   # a growth inside the run
  for r in _records(range(6)):
    tracker.log(r)
  tracker.log_image("loss_curves", _png(tmp_path / "loss_curves.png"))
  summary = tracker.run.summary
  assert summary["growth/loss_dst"] == 4.2       # not overwritten by the stage's report
  assert summary["growth_stage2/loss_dst"] == 3.9
  assert summary["growth/plan/width"] == "tile"
  assert list(summary["growth/dims/d_model"]) == [64, 128]
  # W&B closes a step's history row (and updates the summary) when a later step arrives, so
  # until close the summary holds step 4, the last closed row.
  assert summary["train_loss"] == pytest.approx(4.6)
  assert summary["eval_loss/heldout"] == pytest.approx(5.1)
  tracker.close()
  tracker.close()  # idempotent
  files = _wandb_files(workdir)
  assert len(files) == 1 and os.path.getsize(files[0]) > 0
  assert os.path.basename(files[0]) == f"run-{tracker.run_id}.wandb"
  media = os.path.join(os.path.dirname(files[0]), "files", "media")
  assert glob.glob(os.path.join(media, "images", "loss_curves_*.png"))
  assert glob.glob(os.path.join(media, "table", "growth", "report_*.table.json"))
  with open(workdir / "wandb" / tracking.STATE_FILE) as f:
    assert json.load(f)["last_step"] == 5


def test_resume_appends_to_same_run_and_skips_logged_steps(tmp_path, capfd):
  workdir = str(tmp_path / "run")
  with tracking.make_tracker(resolve(_config()), workdir) as first:
    for r in _records(range(6)):
      first.log(r)
    rid = first.run_id
  second = tracking.make_tracker(resolve(_config()), workdir)
  assert second.run_id == rid
  for r in _records(range(3, 9)):
    second.log(r)
  assert second._skipped == [3, 4, 4, 5]  # the train and eval records already in W&B
  assert second.run.summary["train_loss"] == pytest.approx(4.3)  # step 7: 8's row is open
  second.close()
  assert "monotonically" not in capfd.readouterr().err  # W&B never saw a step go back
  assert len(_wandb_files(workdir)) == 2  # `wandb sync` appends both to run `rid`


def test_run_id_is_stable_per_run_dir(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  rid = tracking.run_id(a)
  assert tracking.run_id(a) == rid
  assert tracking.run_id(os.path.join(a, ".")) == rid
  assert tracking.run_id(b) != rid
  assert rid.isalnum() and len(rid) == 16
  # A run dir deleted and recreated at the same path is a new W&B run, not a resumption.
  os.remove(os.path.join(a, "wandb", tracking.STATE_FILE))
  assert tracking.run_id(a) != rid


def test_growth_run_tags_and_sweep_group(tmp_path):
  c = _config(tags=("x", "y"))
  c.init.source = "/runs/small"
  c.init.plan.width, c.init.plan.depth = "noise", "stack"
  c.sweep_name = "grow-sweep"
  fields = tracking.wandb_fields(resolve(c))
  assert tracking.run_tags(resolve(c), fields) == ["x", "y", "noise+stack", "d64-L2"]
  with tracking.make_tracker(resolve(c), str(tmp_path / "run")) as t:
    assert t.run.group == "grow-sweep"


def test_disabled_gives_noop_tracker(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  c = config_lib.base_config("nano")
  tracker = tracking.make_tracker(resolve(c), str(workdir))
  assert type(tracker) is tracking.Tracker  # pylint: disable=unidiomatic-typecheck
  monkeypatch.setenv("WANDB_MODE", "disabled")
  assert type(tracking.make_tracker(resolve(_config()), str(workdir))) is tracking.Tracker
  tracking.check_wandb(resolve(c))
  assert not os.path.exists(workdir)  # nothing written, not even the wandb dir


def test_base_tracker_accepts_the_same_calls(tmp_path):
  with tracking.Tracker() as t:
    t.log({"step": 0, "train_loss": 1.0})
    t.log({"step": 0, "event": "growth", "method": "tile+identity"})
    t.log_report(REPORT)
    t.log_image("loss_curves", str(tmp_path / "missing.png"))
  t.close()


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
  for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
    monkeypatch.delenv(var, raising=False)
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("NETRC", str(home / ".netrc"))
  return home


def test_online_without_api_key_fails_fast(tmp_path, no_credentials):
  c = _config(mode="online")
  workdir = tmp_path / "run"
  for fn in (tracking.check_wandb, lambda cfg: tracking.make_tracker(cfg, str(workdir))):
    with pytest.raises(GrowlmError) as e:
      fn(resolve(c))
    msg = str(e.value)
    assert "\n" not in msg
    assert "WANDB_API_KEY" in msg and "wandb.mode=offline" in msg and "wandb.enabled=False" in msg
  assert not os.path.exists(workdir)
  c.wandb.mode = "offline"
  tracking.check_wandb(resolve(c))  # offline needs no key


def test_online_credentials_found_without_network(no_credentials, monkeypatch):
  c = _config(mode="online")
  (no_credentials / ".netrc").write_text(
      "machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
  tracking.check_wandb(resolve(c))  # the netrc entry `wandb login` writes is enough
  (no_credentials / ".netrc").unlink()
  monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
  tracking.check_wandb(resolve(c))
  monkeypatch.setenv("WANDB_API_KEY", "short")
  with pytest.raises(GrowlmError, match="WANDB_API_KEY is malformed"):
    tracking.check_wandb(resolve(c))


@pytest.mark.parametrize("field,value", [("mode", "cloud"), ("project", ""), ("tags", ("x" * 65,)),
                                         ("projcet", "typo")])
def test_bad_wandb_fields_name_the_field(field, value):
  c = _config()
  c.wandb[field] = value
  with pytest.raises(GrowlmError, match=f"wandb.{field}"):
    tracking.check_wandb(resolve(c))


def test_bad_wandb_mode_env(monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "cloud")
  with pytest.raises(GrowlmError, match="WANDB_MODE='cloud'"):
    tracking.check_wandb(resolve(_config()))


def _train_config(**wandb_fields):
  from conftest import run_config  # pylint: disable=g-import-not-at-top
  return run_config(**{"train.num_steps": 6, **{f"wandb.{k}": v for k, v in wandb_fields.items()}})


def test_trainer_logs_to_wandb_offline(tmp_path, monkeypatch):
  from growlm import commands  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("WANDB_MODE", "offline")
  commands.train(_train_config(enabled=True), str(tmp_path))
  runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
  assert len(runs) == 1 and runs[0].stat().st_size > 0
  assert (tmp_path / "loss_curve.png").exists()   # the run's plot, logged as an image


def test_trainer_refuses_online_wandb_without_key_before_writing(tmp_path, monkeypatch):
  from growlm import commands  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("WANDB_MODE", "online")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
  with pytest.raises(GrowlmError, match="WANDB_API_KEY") as e:
    commands.train(_train_config(enabled=True), str(tmp_path / "run"))
  assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_compute_axes_are_defined_for_every_run(tmp_path, monkeypatch):
  """tokens, FLOPs, FLOPs with source and wall-clock are W&B step axes, and the losses default
  to FLOPs with source (the axis grown and scratch runs share)."""
  import wandb  # pylint: disable=g-import-not-at-top
  calls = []
  real = wandb.sdk.wandb_run.Run.define_metric

  def spy(self, name, *args, **kwargs):
    calls.append((name, kwargs.get("step_metric"), kwargs.get("summary")))
    return real(self, name, *args, **kwargs)

  monkeypatch.setattr(wandb.sdk.wandb_run.Run, "define_metric", spy)
  tracker = tracking.make_tracker(resolve(_config()), str(tmp_path / "run"))
  for r in _records(range(3)):
    tracker.log({**r, "flops_with_source": 1e6 * r["step"], "wall_seconds": 0.5 * r["step"]})
  tracker.close()
  assert [(n, s) for n, s, _ in calls] == (
      [(axis, None) for axis in tracking.AXES]
      + [("train_loss", "flops_with_source"), ("eval_loss/*", "flops_with_source")])
  assert all(summary == "max" for n, _, summary in calls if n in tracking.AXES)


def test_sweep_results_go_to_the_sweeps_group(tmp_path):
  """An analysed sweep whose runs log to W&B logs its results table and plot to one run of the
  sweep's group (offline here); a sweep without W&B logs nothing."""
  cfg = {"name": "grown_tile", "sweep_name": "paper", "wandb": {
      "enabled": True, "project": "growlm", "entity": "", "mode": "offline", "group": ""}}
  png = _png(tmp_path / "loss_curves.png")
  rid = tracking.log_sweep_results(str(tmp_path), cfg, ["run", "savings"],
                                   [["grown_tile", 0.25]], png)
  assert rid == tracking.run_id(str(tmp_path))
  [run_dir] = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{rid}"))
  media = os.path.join(run_dir, "files", "media")
  assert glob.glob(os.path.join(media, "table", "results_*.table.json"))
  assert glob.glob(os.path.join(media, "images", "loss_curves_*.png"))
  # Named after the group (the sweep's name when wandb.group is empty).
  [log] = glob.glob(os.path.join(run_dir, f"run-{rid}.wandb"))
  # wandb's service process may still be writing the log when finish() returns (seen on a busy
  # machine): wait for it rather than read a file that holds only its header.
  for _ in range(100):
    if b"paper-results" in open(log, "rb").read():
      break
    time.sleep(0.1)
  assert b"paper-results" in open(log, "rb").read()
  off = dict(cfg, wandb=dict(cfg["wandb"], enabled=False))
  assert tracking.log_sweep_results(str(tmp_path / "none"), off, ["run"], []) is None
  assert not (tmp_path / "none").exists()


def _state(workdir):
  from growlm import fs  # pylint: disable=g-import-not-at-top
  return json.loads(fs.read_bytes(fs.join(workdir, "wandb", tracking.STATE_FILE)))


def test_the_resume_state_is_written_per_step_locally_and_at_flush_on_gs(gcs, tmp_path,
                                                                         monkeypatch):
  """A local run dir stores the last logged step at every step. A gs:// one stores it at most
  every metrics.UPLOAD_EVERY_S (each write is an object upload), at flush and at close,
  and a relaunch still resumes after the last step."""
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_local"))
  writes = []
  real = tracking._write_state  # pylint: disable=protected-access
  monkeypatch.setattr(tracking, "_write_state",
                      lambda w, s: (writes.append((w, s["last_step"])), real(w, s))[1])
  local = str(tmp_path / "run")
  with tracking.make_tracker(resolve(_config()), local) as t:
    for r in _records(range(3)):
      t.log(r)
      assert _state(local)["last_step"] == r["step"]

  run = gcs.bucket() + "/run"
  writes.clear()
  t = tracking.make_tracker(resolve(_config()), run)
  for r in _records(range(6)):
    t.log(r)
  assert writes == [(run, None)]                 # the run id alone, when it was made
  assert _state(run)["last_step"] is None
  t.flush()
  t.flush()                                      # nothing new: no second write
  assert writes[1:] == [(run, 5)] and _state(run)["last_step"] == 5
  monkeypatch.setattr(metrics, "UPLOAD_EVERY_S", 0.0)
  t.log(_records([6])[0])
  assert writes[2:] == [(run, 6)]
  monkeypatch.setattr(metrics, "UPLOAD_EVERY_S", 3600.0)
  t.log(_records([7])[0])
  t.close()
  assert writes[3:] == [(run, 7)] and _state(run)["last_step"] == 7
  second = tracking.make_tracker(resolve(_config()), run)
  for r in _records(range(6, 9)):
    second.log(r)
  assert second._skipped == [6, 6, 7]   # pylint: disable=protected-access
  second.close()


def test_the_trainer_flushes_the_tracker_before_each_checkpoint(tmp_path, monkeypatch):
  from growlm import commands  # pylint: disable=g-import-not-at-top
  calls = []

  class Recording(tracking.Tracker):
    def log(self, record):
      if "train_loss" in record:
        calls.append(("log", record["step"]))

    def flush(self):
      calls.append(("flush", None))

  from conftest import run_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tracking, "make_tracker", lambda config, workdir: Recording())
  commands.train(run_config(**{"train.num_steps": 6, "checkpoint.every_steps": 3,
                               "log.every_steps": 1}), str(tmp_path))
  flushed_after = [calls[i - 1][1] for i, c in enumerate(calls) if c[0] == "flush"]
  assert flushed_after == [3, 6], calls        # right after the train line of each checkpoint
