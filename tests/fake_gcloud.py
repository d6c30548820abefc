"""A stand-in for `gcloud compute tpus ...` on this machine, for the launcher's end-to-end tests.

A "TPU" is a folder FAKE_TPU_ROOT/NAME with one home folder per worker (worker-0, worker-1, ...);
FAKE_TPU_ROOT/tpus.json lists them ({"NAME": {"state": "READY", "workers": 2}}). `tpu-vm ssh
--worker=all --command=CMD` runs `bash -c CMD` once per worker, at the same time, as a local
process with that worker's HOME, TPU_WORKER_ID and jax.distributed settings (a fresh
localhost coordinator port per call, GROWLM_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID), so
the 2 workers of a run are 2 jax.distributed processes; what the command starts detached keeps
running after this program exits, as on a real TPU VM. `tpu-vm scp` copies into every home;
`queued-resources create/describe/delete` add, show and remove a TPU. Workers find a fake
`python3.11` first on PATH (FAKE_TPU_ROOT/bin): `-m venv DIR` makes a venv whose python is this
test's interpreter and whose pip succeeds, or fails on the worker FAKE_PIP_FAIL_WORKER names.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

ROOT = os.environ.get("FAKE_TPU_ROOT", "")
TPUS = os.path.join(ROOT, "tpus.json")


def _tpus() -> dict:
  with open(TPUS) as f:
    return json.load(f)


def _save(tpus: dict) -> None:
  with open(TPUS, "w") as f:
    json.dump(tpus, f)


def _homes(name: str) -> list[str]:
  n = _tpus()[name]["workers"]
  homes = [os.path.join(ROOT, name, f"worker-{i}") for i in range(n)]
  for h in homes:
    os.makedirs(h, exist_ok=True)
  return homes


def _not_found(verb: str, name: str) -> int:
  print(f"ERROR: (gcloud.compute.tpus.{verb}) NOT_FOUND: Resource 'projects/p/locations/z/nodes/"
        f"{name}' was not found", file=sys.stderr)
  return 1


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def ssh(name: str, command: str) -> int:
  stdin = sys.stdin.read()
  homes, port = _homes(name), _port()
  procs = []
  for i, home in enumerate(homes):
    env = dict(os.environ)   # each host one CPU device (the tests' fast-compile flags kept)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env.update(HOME=home, TPU_WORKER_ID=str(i), PATH=os.path.join(ROOT, "bin") + ":" + env["PATH"],
               GROWLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               GROWLM_NUM_PROCESSES=str(len(homes)), GROWLM_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE))
  code = 0
  for p in procs:
    out, err = p.communicate(stdin)
    sys.stdout.write(out)
    sys.stderr.write(err)
    code = code or p.returncode
  return code


def main(argv: list[str]) -> int:
  flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--") and "=" in a}
  words = [a for a in argv if not a.startswith("--")]
  if words[:3] == ["compute", "tpus", "tpu-vm"]:
    verb, rest = words[3], words[4:]
    if verb == "scp":
      src, dest = rest
      name, _, path = dest.partition(":")
      if name not in _tpus():
        return _not_found("tpu-vm.scp", name)
      for home in _homes(name):
        shutil.copyfile(src, os.path.join(home, path))
      return 0
    name = rest[0]
    if name not in _tpus():
      return _not_found(f"tpu-vm.{verb}", name)
    if verb == "describe":
      t = _tpus()[name]
      print(json.dumps({"name": name, "state": t["state"],
                        "networkEndpoints": [{"ipAddress": "127.0.0.1"}] * t["workers"]}))
      return 0
    if verb == "ssh" and flags.get("--worker") == "all":
      return ssh(name, flags["--command"])
  if words[:3] == ["compute", "tpus", "queued-resources"]:
    verb, name = words[3], words[4]
    tpus = _tpus()
    if verb == "create":
      tpus[flags["--node-id"]] = {"state": "READY", "workers": 2, "spot": "--spot" in argv}
      _save(tpus)
      return 0
    if name not in tpus:
      return _not_found(f"queued-resources.{verb}", name)
    if verb == "describe":
      print("ACTIVE" if tpus[name]["state"] == "READY" else "SUSPENDED")
      return 0
    if verb == "delete":
      del tpus[name]
      _save(tpus)
      return 0
  print(f"fake gcloud: unsupported: {argv}", file=sys.stderr)
  return 2


PYTHON311 = '''#!/bin/sh
# fake python3.11: `-m venv DIR` only
[ "$1 $2" = "-m venv" ] || exit 2
mkdir -p "$3/bin"
printf '#!/bin/sh\\nexec %s "$@"\\n' "{python}" > "$3/bin/python"
cat > "$3/bin/pip" <<'EOF'
#!/bin/sh
if [ "$TPU_WORKER_ID" = "$FAKE_PIP_FAIL_WORKER" ]; then
  echo "ERROR: No matching distribution found for libtpu==0.0.42.*" >&2
  exit 1
fi
EOF
chmod +x "$3/bin/python" "$3/bin/pip"
'''


def install(root: str, bin_dir: str, tpus: dict) -> None:
  """Writes `gcloud` into bin_dir (put it first on PATH) and the worker tools into root/bin."""
  os.makedirs(os.path.join(root, "bin"), exist_ok=True)
  os.makedirs(bin_dir, exist_ok=True)
  with open(os.path.join(root, "tpus.json"), "w") as f:
    json.dump(tpus, f)
  tools = {os.path.join(bin_dir, "gcloud"):
           f'#!/bin/sh\nexec "{sys.executable}" "{os.path.abspath(__file__)}" "$@"\n',
           os.path.join(root, "bin", "python3.11"): PYTHON311.format(python=sys.executable)}
  for path, text in tools.items():
    with open(path, "w") as f:
      f.write(text)
    os.chmod(path, 0o755)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
