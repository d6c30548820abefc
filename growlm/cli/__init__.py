"""Command-line entry points (absl). Each parses flags, calls one library function from
growlm.commands or growlm.experiments, and turns a GrowlmError into one `growlm: error:` line.

  flags.py   --config=PATH[:ARG] and --config.FIELD=VALUE parsing with clear errors
  train.py   python -m growlm.main       train or resume one run
  grow.py    python -m growlm.grow_main  grow a run into a new run dir at step 0
  hf.py      python -m growlm.hf_main    Hugging Face grow / train / export
  demo.py    python -m growlm.demo       make demo
"""
