"""The sweep launcher's one entry: a sweep run here (`sweep.launch`, backend 'local') or handed to
a remote backend that returns at once (`remote.launch` with the gcloud or SkyPilot module). It
sits above sweep, remote and the backends, so none of them imports another's caller."""

from __future__ import annotations

from growlm.errors import GrowlmError
from growlm.experiments import gcloud, remote, skypilot, sweep


def launch(config: str, sweep_dir: str, *, backend: str = "local", **kwargs) -> list:
  """Runs or submits every run of the sweep (see sweep.launch and remote.launch for `kwargs`)."""
  if backend not in sweep.BACKENDS:
    raise GrowlmError(f"--backend={backend}; accepted: {', '.join(sweep.BACKENDS)}")
  if backend == "local":
    return sweep.launch(config, sweep_dir, **kwargs)
  sweep.check_sweep_dir(sweep_dir)
  kwargs.pop("run_fn", None)
  return remote.launch(config, sweep_dir, backend,
                       backend_module=gcloud if backend == "gcloud" else skypilot, **kwargs)
