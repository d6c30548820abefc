"""Experiments: sweeps as config code and the analysis of grown vs scratch runs.

  sweep.py     expand a config file's sweep(add), order runs by dependency, run or print them
  analysis.py  read a sweep's run dirs: FLOPs to reach the baseline's loss, savings, tables
"""
