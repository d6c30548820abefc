"""The initialisation seam in front of the trainer, in big_vision's order: resume this run from
its own checkpoint, else start from a source (a growlm run dir or a Hugging Face directory) grown
by the plan, else a fresh init.

  source.py  reading and restoring a source, growing it into the first TrainState
  seam.py    choosing the start and building it; the effective config of a run dir
"""
