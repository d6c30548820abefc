"""The sharded trainer. It trains the state it is handed and knows nothing of where it came from.

  state.py       TrainState, its shardings, and whether it fits a device
  loss.py        cross-entropy
  evaluate.py    eval step and the Evaluator (held-out loss and bits per byte)
  checkpoint.py  orbax CheckpointManager: save, restore the newest good step
  checkpoint_files.py  what a step holds on disk: its files, their hashes, what a restore error means
  metrics.py     metrics.jsonl writer, progress bar
  tracking.py    W&B tracker (off by default)
  trainer.py     the jitted step and the loop: train, evaluate, checkpoint, log
  stages.py      growth stages at run time: each stage's model, steps and FLOPs, one schedule
  signals.py     SIGTERM/SIGINT/SIGHUP: finish the step, save it, exit 75 (during start-up:
                 stop at once, nothing written, exit 75)
  agree.py       several processes: the same config and run dir on each, checked first; then
                 process 0 takes the run dir's lease for all
  peers.py       several processes: they join within --join_timeout and end together
  aot.py         --compile_for: the run's programs compiled for a TPU slice that is not here
                 (aot_programs.py: the eval step, each growth and its preservation report)
"""
