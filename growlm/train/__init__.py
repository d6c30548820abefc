"""The sharded trainer. It trains the state it is handed and knows nothing of where it came from.

  state.py       TrainState and its shardings
  loss.py        cross-entropy
  evaluate.py    eval step and the Evaluator (held-out loss and bits per byte)
  checkpoint.py  orbax CheckpointManager: save, restore the newest good step
  metrics.py     metrics.jsonl writer, progress bar
  tracking.py    W&B tracker (off by default)
  trainer.py     the jitted step and the loop: train, evaluate, checkpoint, log
"""
