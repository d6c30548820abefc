"""The sweep launcher's remote backends without a cloud: golden --dry_run outputs, SkyPilot task
files read by SkyPilot's own parser, sweep states, the host-side worker, W&B key handling and
one-line refusals. (The gcloud backend end to end: test_launch_e2e.py.)"""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from conftest import REPO, user_env
from growlm import fs
from growlm.errors import GrowlmError
from growlm import lock as lock_lib
from growlm.experiments import gcloud, launcher, remote, skypilot, status, sweep, worker

QUICK = str(REPO / "configs" / "quickstart.py")
GOLDEN = REPO / "tests" / "golden"
KEY = "0123456789abcdef" * 2 + "0123456789ab"   # a fake 44-character W&B key
ATTEMPT = "20260101-000000"
DRY_RUNS = {
    "gcloud": dict(backend="gcloud", tpu="my-tpu", zone="us-central2-b", project="my-project"),
    "gcloud_spot": dict(backend="gcloud", tpu="my-tpu", zone="us-central2-b", spot=True,
                        accelerator_type="v4-32"),
    "skypilot_gpu": dict(backend="skypilot", accelerators="H100:8", num_nodes=2, spot=True,
                         only=("source", "grown_tile")),
}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
  for k in remote.WANDB_VARS:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
  monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
  monkeypatch.setenv("WANDB_API_KEY", KEY)
  monkeypatch.setenv("WANDB_ENTITY", "my-team")
  monkeypatch.setenv("WANDB_MODE", "online")


def _normalise(lines: list[str]) -> str:
  text = "\n".join(lines).replace(str(REPO), "<CHECKOUT>")
  return re.sub(r"/[^\s'\"]*/(growlm-(?:launch|sky)-)[A-Za-z0-9_]+", r"<TMP>/\1XXXX", text) + "\n"


@pytest.mark.parametrize("case", sorted(DRY_RUNS))
def test_dry_run_matches_golden_and_never_shows_the_key(case, wandb_env):
  """tests/golden/CASE.txt is the exact --dry_run output (checkout and temp paths normalised);
  regenerate with GROWLM_UPDATE_GOLDEN=1 after an intended change, and read the diff."""
  lines = []
  launcher.launch(QUICK, "gs://my-bucket/sweeps/demo", dry_run=True, echo=lines.append,
               attempt=ATTEMPT, **DRY_RUNS[case])
  got = _normalise(lines)
  path = GOLDEN / f"{case}.txt"
  if os.environ.get("GROWLM_UPDATE_GOLDEN"):
    path.write_text(got)
  assert got == path.read_text()
  assert KEY not in got
  assert "WANDB_API_KEY=<redacted>" in got or "--env WANDB_API_KEY" in got
  assert "WANDB_ENTITY" in got


def test_gcloud_dry_run_starts_every_worker_on_one_plan(wandb_env):
  lines = []
  launcher.launch(QUICK, "gs://b/s", dry_run=True, echo=lines.append, attempt=ATTEMPT,
               **DRY_RUNS["gcloud"])
  ssh = [l for l in lines if l.startswith("gcloud compute tpus tpu-vm ssh my-tpu")]
  assert len(ssh) == 2 and all("--worker=all" in l and "--project=my-project" in l for l in ssh)
  assert "pip install -q -e \".[tpu]\"" in ssh[0] and "-m growlm.worker" in ssh[1]
  assert f"--plan=gs://b/s/launch/{ATTEMPT}.json" in ssh[1]
  plan = [l[4:] for l in lines if l.startswith("#   python -m growlm.main")]
  assert [re.search(r"--workdir=(\S+)", l).group(1) for l in plan] == [
      "gs://b/s/source", "gs://b/s/grown_tile", "gs://b/s/grown_zeros", "gs://b/s/scratch"]


def test_gcloud_refuses_a_run_whose_source_is_neither_finished_nor_launched():
  runs = sweep.expand(QUICK, "gs://b/s")
  plan = remote.make_plan("configs/quickstart.py", [r for r in runs if r.name == "grown_tile"],
                          None, ATTEMPT, "auto")
  lines = []
  job = gcloud.Launch(remote.Settings(tpu="t", zone="z"), "gs://b/s", str(REPO), plan, {},
                      remote.Shell(lines.append, True), {})
  pending = [status.RunState(r.name, "pending", None, None, "not submitted") for r in runs]
  with pytest.raises(GrowlmError, match="grows from source, which is not finished"):
    job.submit_ready(pending, set())
  assert lines == []   # refused before any command
  job.submit_ready([status.RunState("source", "finished", 300, 2.0, "")] + pending[1:], set())
  assert any(l.startswith("gcloud compute tpus tpu-vm describe t") for l in lines)


_SKY_PARSE = r"""
import json, sys
import sky
out = {}
for path in sys.argv[1:]:
  try:
    t = sky.Task.from_yaml(path)
  except ValueError as e:
    out[path] = {"error": str(e)}
    continue
  r = list(t.resources)[0]
  out[path] = {"name": t.name, "num_nodes": t.num_nodes, "envs": dict(t.envs), "run": t.run,
               "setup": t.setup, "workdir": t.workdir, "use_spot": r.use_spot,
               "accelerators": r.accelerators, "cloud": str(r.cloud) if r.cloud else None,
               "accelerator_args": r.accelerator_args, "file_mounts": t.file_mounts}
print(json.dumps(out))
"""


def test_skypilot_task_files_pass_skypilots_own_parser(tmp_path, wandb_env):
  """Each task file the backend writes (a TPU pod slice on spot, a 2-node GPU cluster, CPU
  nodes, the GPU one off GCP with a GCS key to copy) is read back by SkyPilot's Task.from_yaml,
  offline; a misspelt field is refused by the same parser, so the check is real."""
  key = tmp_path / "sa-key.json"
  key.write_text("{}")
  cases = {"tpu": remote.Settings(accelerators="tpu-v4-32", spot=True),
           "gpu": remote.Settings(accelerators="H100:8", num_nodes=2),
           "cpu": remote.Settings()}
  paths = []
  for name, s in cases.items():
    t = skypilot.task(s, "gs://b/sweeps/demo", str(REPO), "gs://b/sweeps/demo/launch/a.json",
                      "grown_tile", remote.wandb_env(),
                      skypilot.gcs_key(s, {"GOOGLE_APPLICATION_CREDENTIALS": str(key)}))
    paths.append(tmp_path / f"{name}.yaml")
    paths[-1].write_text(skypilot.dump(t))
  bad = tmp_path / "bad.yaml"
  bad.write_text(paths[0].read_text().replace("accelerators:", "acelerators:"))
  env = dict(os.environ, HOME=str(tmp_path), SKYPILOT_DISABLE_USAGE_COLLECTION="1")
  res = subprocess.run([sys.executable, "-c", _SKY_PARSE, *map(str, paths), str(bad)],
                       capture_output=True, text=True, env=env, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  got = json.loads(res.stdout.strip().splitlines()[-1])
  tpu, gpu, cpu = (got[str(p)] for p in paths)
  assert tpu["accelerators"] == {"tpu-v4-32": 1} and tpu["use_spot"] and tpu["num_nodes"] == 1
  assert tpu["cloud"] == "GCP" and tpu["accelerator_args"]["runtime_version"] == \
      "tpu-ubuntu2204-base"
  assert gpu["accelerators"] == {"H100": 8} and gpu["num_nodes"] == 2 and not gpu["use_spot"]
  assert cpu["accelerators"] is None and cpu["cloud"] is None
  for t, extra in ((tpu, ".[tpu]"), (gpu, ".[cuda]"), (cpu, '-e "."')):
    assert t["name"] == "growlm-demo-grown_tile" and t["workdir"] == str(REPO)
    assert t["envs"]["GROWLM_RUN"] == "grown_tile" and t["envs"]["WANDB_ENTITY"] == "my-team"
    assert remote.SECRET not in t["envs"] and extra in t["setup"]
    assert "-m growlm.worker" in t["run"]
  assert "GROWLM_PROCESS_ID=\"$SKYPILOT_NODE_RANK\"" in gpu["run"]
  assert gpu["file_mounts"] == {skypilot.GCS_KEY: str(key)} and not tpu["file_mounts"]
  assert f"export GOOGLE_APPLICATION_CREDENTIALS={skypilot.GCS_KEY}" in gpu["run"]
  assert "GROWLM_COORDINATOR_ADDRESS" not in tpu["run"] + cpu["run"]
  assert "acelerators" in got[str(bad)]["error"]


def test_skypilot_submits_ready_runs_and_leaves_the_others_waiting(wandb_env):
  lines, ran = [], []

  class Recorder(remote.Shell):
    def run(self, cmd, **kw):
      ran.append(cmd)
      return super().run(cmd, **kw)

  settings = remote.Settings(accelerators="H100:8")
  runs = sweep.expand(QUICK, "gs://b/s")
  plan = remote.make_plan("configs/quickstart.py", runs, None, ATTEMPT, "none")
  job = skypilot.Launch(settings, "gs://b/s", str(REPO), plan, {}, Recorder(lines.append, True),
                        remote.wandb_env())
  states = [status.RunState(r.name, "pending", None, None, "not submitted") for r in runs]
  job.submit_ready(states, set())
  assert [c[-1].rsplit("/", 1)[1] for c in ran] == ["source.sky.yaml", "scratch.sky.yaml"]
  assert any("grown_tile, grown_zeros wait(s) for their sources" in l for l in lines)
  ran.clear()
  states[0] = status.RunState("source", "finished", 300, 2.0, "checkpoint 300")
  states[3] = status.RunState("scratch", "running", 10, 3.0, "")
  job.submit_ready(states, set(), quiet=True)   # a --wait poll
  assert [c[-1].rsplit("/", 1)[1] for c in ran] == ["grown_tile.sky.yaml", "grown_zeros.sky.yaml"]
  assert all("--env" in c and remote.SECRET in c for c in ran)


@pytest.mark.parametrize("launch,beats,now,want", [
    ({"attempt": "a", "submitted": 0.0, "backend": "gcloud"}, {}, 90.0, ("pending", "submitted")),
    ({"attempt": "a"}, {"0": {"attempt": "a", "state": "running", "updated": 100.0},
                        "1": {"attempt": "a", "state": "running", "updated": 95.0}}, 130.0,
     ("running", "2 worker(s), last heartbeat 30 s ago")),
    ({"attempt": "a"}, {"0": {"attempt": "a", "state": "running", "updated": 100.0}},
     100.0 + status.STALE_S + 1, ("failed", "no heartbeat for 10 min")),
    ({"attempt": "a"}, {"0": {"attempt": "a", "state": "running", "updated": 100.0},
                        "1": {"attempt": "a", "state": "exited", "code": 75}}, 101.0,
     ("failed", "worker 1 exited 75: stopped by a signal")),
    ({"attempt": "b"}, {"0": {"attempt": "a", "state": "exited", "code": 3}}, 10.0,
     ("pending", "submitted")),   # a relaunch: the old attempt's exit no longer counts
    ({"attempt": "a"}, {"0": {"attempt": "a", "state": "exited", "code": 0}}, 10.0,
     ("failed", "every worker exited 0 before the last step")),
    (None, {}, 0.0, ("pending", "not submitted")),
    ({"attempt": "a", "backend": "skypilot"},
     {"0": {"attempt": "a", "state": "exited", "code": 75}}, 10.0,
     ("pending", "preempted: worker 0 exited 75; SkyPilot relaunches")),
])
def test_run_states_from_the_run_dir(launch, beats, now, want):
  state, detail = status.classify(20, [10], launch, beats, now)
  assert (state, detail[:len(want[1])]) == want
  assert status.classify(20, [10, 20], launch, beats, now) == ("finished", "checkpoint 20")


def test_status_reads_the_sweep_dir_and_names_what_waits(tmp_path):
  runs = sweep.manifest("c.py", sweep.expand(QUICK, str(tmp_path)), None, "gcloud", {})["runs"]
  src = runs[0]["workdir"]
  os.makedirs(os.path.join(src, "checkpoints", "300"))
  with open(os.path.join(src, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 300, "train_loss": 2.5}) + "\n{torn")
  os.makedirs(os.path.join(runs[1]["workdir"], "logs"))
  fs.write_json_atomic(status.launch_path(runs[1]["workdir"]), {"attempt": "x", "submitted": 0})
  states = {s.name: s for s in status.read(runs, now=60.0)}
  assert (states["source"].state, states["source"].step, states["source"].loss) == \
      ("finished", 300, 2.5)
  assert states["grown_tile"].detail.startswith("submitted 60 s ago")
  assert states["scratch"].detail == "not submitted"
  # A run of the local backend (no launch.json): running while a launch holds its run dir's
  # lease, else stopped at its last checkpoint.
  os.makedirs(os.path.join(runs[2]["workdir"], "checkpoints", "10"))
  with lock_lib.RunLock(runs[3]["workdir"]):
    states = {s.name: s for s in status.read(runs)}
    assert (states["scratch"].state, states["scratch"].detail[:len(f"pid {os.getpid()} ")]) == \
        ("running", f"pid {os.getpid()} ")
  assert (states["grown_zeros"].state, states["grown_zeros"].detail) == \
      ("pending", "stopped at checkpoint 10; relaunch to resume")
  assert status.read(runs)[3].detail == "not submitted"   # the lease released
  # Started (its config.json, its step-0 eval), stopped before a step: no "step 0" (-), and
  # said so (it read "not submitted"); past a step but before a checkpoint, that step.
  fs.write_json_atomic(os.path.join(runs[3]["workdir"], "config.json"), {})
  with open(os.path.join(runs[3]["workdir"], "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "eval_loss/heldout": 5.0}) + "\n")
  s = status.read(runs)[3]
  assert (s.state, s.step, s.detail) == ("pending", None,
                                         "started, stopped before its first step; relaunch to "
                                         "resume")
  assert status.table([s]).splitlines()[1].split()[:4] == ["scratch", "pending", "-", "-"]
  with open(os.path.join(runs[3]["workdir"], "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 5, "train_loss": 4.0}) + "\n")
  assert status.read(runs)[3].detail.startswith("started, stopped at step 5 before its first")
  table = status.table(list(states.values())).splitlines()
  assert table[0].split() == ["run", "state", "step", "loss", "detail"] and len(table) == 5


def _plan(tmp_path, codes):
  runs = []
  for i, code in enumerate(codes):
    runs.append({"name": f"r{i}", "workdir": str(tmp_path / "sweep" / f"r{i}"), "num_steps": 5,
                 "depends": [], "argv": ["python", "-c", f"print('run r{i}'); exit({code})"]})
  return {"attempt": "t1", "distributed": "none", "runs": runs}


def test_worker_trains_in_order_records_exits_and_stops_at_the_first_failure(tmp_path):
  plan = _plan(tmp_path, [0, 0, 3, 0])
  os.makedirs(os.path.join(plan["runs"][1]["workdir"], "checkpoints", "5"))   # r1 is finished
  code = worker.drive(plan, "w0", logs=str(tmp_path / "logs"), heartbeat_s=5, env={})
  assert code == 3
  beat = lambda r: json.loads(fs.read_text(status.heartbeat_path(r["workdir"], "w0")))
  r0, r1, r2, r3 = plan["runs"]
  assert (beat(r0)["state"], beat(r0)["code"], beat(r0)["attempt"]) == ("exited", 0, "t1")
  assert not os.path.exists(os.path.join(r1["workdir"], "logs"))   # skipped, not rerun
  assert beat(r2)["code"] == 3 and "run r2" in fs.read_text(status.log_path(r2["workdir"], "w0"))
  assert not os.path.exists(r3["workdir"])   # never started after r2 failed


def test_worker_passes_the_distributed_settings():
  env = {"GROWLM_COORDINATOR_ADDRESS": "10.0.0.1:8476", "GROWLM_NUM_PROCESSES": "4",
         "GROWLM_PROCESS_ID": "2"}
  assert worker.distributed_flags("auto", env) == [
      "--coordinator_address=10.0.0.1:8476", "--num_processes=4", "--process_id=2"]
  assert worker.distributed_flags("auto", {}) == ["--distributed"]
  assert worker.distributed_flags("none", {}) == []
  with pytest.raises(GrowlmError, match="GROWLM_PROCESS_ID"):
    worker.distributed_flags("auto", {k: v for k, v in env.items() if k != "GROWLM_PROCESS_ID"})


def test_wandb_key_comes_from_netrc_and_is_shown_redacted(tmp_path, monkeypatch):
  for k in remote.WANDB_VARS:
    monkeypatch.delenv(k, raising=False)
  rc = tmp_path / "netrc"
  rc.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
  rc.chmod(stat.S_IRUSR | stat.S_IWUSR)
  monkeypatch.setenv("NETRC", str(rc))
  monkeypatch.setenv("WANDB_PROJECT", "growth")
  env = remote.wandb_env()
  assert env == {"WANDB_PROJECT": "growth", "WANDB_API_KEY": KEY}
  shown = remote.shown_env(env)
  assert KEY not in shown and "WANDB_API_KEY=<redacted>" in shown
  assert "WANDB_PROJECT=growth" in shown
  monkeypatch.setenv("NETRC", str(tmp_path / "none"))
  assert remote.wandb_env() == {"WANDB_PROJECT": "growth"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="local", tpu="t"), "--tpu is a flag of a remote backend"),
    (dict(backend="gcloud", tpu="t"), "needs --tpu=NAME and --zone=ZONE"),
    (dict(backend="gcloud", tpu="t", zone="z", accelerators="H100:8"),
     "--accelerators is not a flag of --backend=gcloud; it belongs to --backend=skypilot"),
    (dict(backend="skypilot", tpu="t"), "--tpu is not a flag of --backend=skypilot"),
    (dict(backend="gcloud", tpu="t", zone="z", spot=True), "--spot needs --accelerator_type"),
    (dict(backend="skypilot", accelerators="tpu-v4-32", num_nodes=2), "--num_nodes=1"),
    (dict(backend="cloud"), "--backend=cloud; accepted: local, gcloud, skypilot"),
])
def test_bad_launcher_flags_are_refused(kwargs, match):
  with pytest.raises(GrowlmError, match=re.escape(match)):
    launcher.launch(QUICK, "gs://b/s", dry_run=True, echo=lambda _: None, **kwargs)


def test_remote_sweeps_need_a_shared_dir_and_a_config_in_the_checkout(tmp_path):
  with pytest.raises(GrowlmError, match="accepted: a gs://bucket/path URL"):
    launcher.launch(QUICK, str(tmp_path / "s"), backend="gcloud", tpu="t", zone="z", dry_run=True)
  outside = tmp_path / "mine.py"
  outside.write_text((REPO / "configs" / "quickstart.py").read_text())
  with pytest.raises(GrowlmError, match="is outside the checkout"):
    launcher.launch(str(outside), "gs://b/s", backend="gcloud", tpu="t", zone="z", dry_run=True)
  assert not (tmp_path / "s").exists()


def test_command_line_fields_apply_to_every_run_before_its_own(tmp_path):
  runs = sweep.expand(QUICK, str(tmp_path / "s"),
                      {"train.num_steps": "7", "train.warmup_steps": "1", "model.d_model": "32"})
  assert {r.config.train.num_steps for r in runs} == {7}
  by = {r.name: r for r in runs}
  assert by["source"].config.model.d_model == 32 and by["scratch"].config.model.d_model == 128
  cmd = sweep.command(QUICK, by["scratch"], overrides={"model.d_model": "32"})
  assert cmd.index("--config.model.d_model=32") < cmd.index("--config.model.d_model=128")
  with pytest.raises(GrowlmError, match="num_step"):
    sweep.expand(QUICK, str(tmp_path / "s"), {"train.num_step": "7"})


def _cli(*args, cwd):
  env = user_env()
  return subprocess.run([sys.executable, str(REPO / "experiments" / "launch.py"), *args],
                        capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_launcher_command_line_errors_are_one_line(tmp_path):
  cases = [
      (["--config=configs/quickstart.py", f"--sweep_dir={tmp_path}/s", "--backend=gcloud",
        "--tpu=t", "--zone=z"], "accepted: a gs://bucket/path URL"),
      (["status", f"--sweep_dir={tmp_path}/s"], "sweep.json does not exist"),
      (["--config=configs/quickstart.py", f"--sweep_dir={tmp_path}/s", "--config.train.colour=1"],
       "colour"),
      (["stats", f"--sweep_dir={tmp_path}/s"], "unknown command 'stats'"),
  ]
  for args, match in cases:
    res = _cli(*args, cwd=REPO)
    lines = [l for l in res.stderr.splitlines() if l.startswith("growlm: error:")]
    assert res.returncode == 2 and len(lines) == 1 and match in lines[0], (args, res.stderr)
    assert "Traceback" not in res.stderr
  assert os.listdir(tmp_path) == []


def test_budget_runs_scale_the_steps_the_command_line_gives(tmp_path):
  """configs/paper.py's 2x/4x scratch runs and its staged run (and scale.py's) scale the
  schedule in use: --config.train.num_steps=100 makes them 200 and 400 steps (they took twice
  and four times the file's default, whatever the command line said)."""
  flags = {"train.num_steps": "100", "train.warmup_steps": "10", "checkpoint.every_steps": "50",
           "eval.every_steps": "10"}
  runs = sweep.expand(str(REPO / "configs" / "paper.py") + ":budgets=1+2+4,staged",
                      str(tmp_path / "p"), flags)
  by = {r.name: r.config for r in runs}
  assert by["source"].train.num_steps == by["both_scratch"].train.num_steps == 100
  for name, factor in (("both_scratch_2x", 2), ("both_scratch_4x", 4)):
    c = by[name]
    assert (c.train.num_steps, c.train.warmup_steps, c.checkpoint.every_steps,
            c.eval.every_steps) == (100 * factor, 10 * factor, 50 * factor, 10 * factor), name
  assert by["both_staged"].train.num_steps == 200
  assert by["both_staged"].stages[0]["step"] == 100
  scale = {r.name: r.config for r in sweep.expand(str(REPO / "configs" / "scale.py"),
                                                  str(tmp_path / "s"), flags)}
  assert [scale[f"scratch_{b}x"].train.num_steps for b in (2, 4)] == [200, 400]


@pytest.mark.parametrize("overrides,words", [
    # tile's width ratio 128/48 is no integer: refused at grown_tile, not after source trains.
    ({"model.d_model": "48"}, ["'grown_tile'", "integer d_model ratio", "48 -> 128"]),
    # the source gets 8 heads, the targets keep their 4: growth does not shrink.
    ({"model.n_heads": "8"}, ["'grown_tile'", "n_heads 8 -> 4", "shrinking"]),
])
def test_a_growth_between_runs_is_checked_before_the_first_run(tmp_path, overrides, words):
  with pytest.raises(GrowlmError) as e:
    sweep.expand(QUICK, str(tmp_path / "s"), overrides)
  assert all(w in str(e.value) for w in words), e.value
  assert not (tmp_path / "s").exists()


def _stop_and_continue_config(tmp_path, stop_at: int) -> str:
  path = tmp_path / f"stop{stop_at}.py"
  path.write_text(
      "from growlm.config import files\n"
      f"get_config = files.load_module({str(REPO / 'configs' / 'quickstart.py')!r}).get_config\n"
      "def sweep(add):\n"
      f"  add(name='source', **{{'train.stop_at': {stop_at}}})\n"
      "  add(name='grown', **{'init.source': '@source', 'init.continue_schedule': True})\n")
  return f"{path}:runlocal"


def test_a_source_stopped_early_leaves_its_schedule_to_continue(tmp_path):
  """docs/design.md 4.1: run A stops at train.stop_at, run B grows it and goes on with its
  schedule. The launch accepts it; without the stop nothing would be left: refused at launch."""
  runs = sweep.expand(_stop_and_continue_config(tmp_path, 6), str(tmp_path / "s"))
  assert [r.name for r in runs] == ["source", "grown"]
  with pytest.raises(GrowlmError, match="'source' stops at step 12, so train.num_steps=12"):
    sweep.expand(_stop_and_continue_config(tmp_path, 0), str(tmp_path / "s"))
