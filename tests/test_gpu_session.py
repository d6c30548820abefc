"""benchmarks/gpu_session.sh's `scale` phase splits a sweep into one launcher per seed, side by
side. The split itself is checked here with a stand-in `python3` on PATH (no training): the run
names come from the launcher's dry run, each seed's launcher gets exactly its own runs, and a
failed launcher fails the phase."""

import os
import subprocess
import textwrap

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
NAMES = ["source-s0", "source-s1", "grown-s0", "grown-s1", "scratch-s0", "scratch-s1",
         "scratch_4x-s0", "scratch_4x-s1"]


def _fake_python(bin_dir, log, fail_on=""):
  """A `python3` that prints a dry run's command lines, or records its arguments (one line per
  call) and fails when they name `fail_on`."""
  lines = "\n".join(f"echo 'python -m growlm.main --workdir=d/{n} --config.name={n} "
                    f"--config.sweep_name=d'" for n in NAMES)
  path = bin_dir / "python3"
  path.write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      if [[ " $* " == *" --dry_run "* ]]; then
      {lines}
        exit 0
      fi
      echo "$*" >> {log}
      [[ -n "{fail_on}" && "$*" == *"{fail_on}"* ]] && exit 1
      exit 0
      """))
  path.chmod(0o755)


def _scale_sweep(tmp_path, fail_on=""):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  _fake_python(bin_dir, log, fail_on)
  body = SCRIPT.read_text().split("scale_sweep() {", 1)[1].split("\n}\n", 1)[0]
  script = "scale_sweep() {" + body + "\n}\nscale_sweep configs/x.py sweepdir 2 --config.a=1\n"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path))
  proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                        cwd=REPO, timeout=60)
  return proc, sorted(log.read_text().splitlines())


def test_each_seed_gets_its_own_runs_and_the_flags(tmp_path):
  proc, calls = _scale_sweep(tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert len(calls) == 2, calls
  for k, call in enumerate(calls):
    args = call.split()
    only = [a for a in args if a.startswith("--only=")]
    assert only == ["--only=" + ",".join(n for n in NAMES if n.endswith(f"-s{k}"))], call
    assert {"experiments/launch.py", "--config=configs/x.py", "--seeds=2",
            "--sweep_dir=sweepdir", "--noanalyze", "--config.a=1"} <= set(args), call
  assert (tmp_path / "scale-s0.log").exists() and (tmp_path / "scale-s1.log").exists()


def test_a_failed_seed_fails_the_phase(tmp_path):
  proc, calls = _scale_sweep(tmp_path, fail_on="source-s1")
  assert proc.returncode != 0 and len(calls) == 2


def test_xlaflags_runs_one_process_per_flag_set_and_goes_on_after_a_failure(tmp_path):
  """`xlaflags`: knobs.py's default variant once per set, each set added to the XLA_FLAGS
  already there (an empty set: those alone), and a set that fails does not stop the next."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  (bin_dir / "python3").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      [[ "$1 $2" == "-m pip" ]] && exit 0
      echo "XLA_FLAGS=[$XLA_FLAGS] $*" >> {log}
      [[ "$XLA_FLAGS" == *--a=1* ]] && exit 3
      exit 0
      """))
  (bin_dir / "python3").chmod(0o755)
  out = tmp_path / "out"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out),
             XLA_FLAGS="--pre=1", XLAFLAGS=" ; --a=1;--b=2 ")
  proc = subprocess.run(["bash", str(SCRIPT), "xlaflags"], env=env, capture_output=True,
                        text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 0, proc.stderr
  calls = log.read_text().splitlines()
  assert [c.split("]", 1)[0] + "]" for c in calls] == [
      "XLA_FLAGS=[--pre=1]", "XLA_FLAGS=[--pre=1 --a=1]", "XLA_FLAGS=[--pre=1 --b=2]"], calls
  for k, call in enumerate(calls):
    assert (f"benchmarks/knobs.py --preset gpt2-124m --variants default "
            f"--out {out}/xlaflags_{k}.json") in call, call
  session = (out / "session.log").read_text()
  assert "xlaflags 1 [--a=1] rc=3" in session and "xlaflags 2 [--b=2] rc=0" in session, session
