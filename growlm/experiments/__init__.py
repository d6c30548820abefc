"""Experiments: sweeps as config code and the analysis of grown vs scratch runs.

  sweep.py     expand a config file's sweep(add), order runs by dependency, run or print them
  remote.py    hand a sweep to remote hosts: plan, code, W&B settings (gcloud.py, skypilot.py)
  worker.py    what each remote host runs: the plan's runs in order, heartbeats and logs
  status.py    each run's state, read from the (shared) sweep dir
  analysis.py  read a sweep's run dirs: FLOPs to reach the baseline's loss, savings, tables
"""
