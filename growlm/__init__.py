"""growlm: grow small pretrained decoder LMs into larger ones, train on, compare with scratch.

The package is laid out by stage, bottom to top; a module imports only from its own line or
the lines above it (tests/test_architecture.py checks the import graph):

  errors, trees, fs, sharding, optim, lock, rundir, curves
                foundations: one error type, tree paths, files, mesh, AdamW, the run-dir
                lease (one writer per run dir), the run dir's files and curves
  model/        the decoder (two styles), its ModelConfig and FLOPs count
  data/         tokenizers, text sources, packed resumable batches, token shards and the
                streaming (grain) loader over them
  grow/         pure growth maps: params (and Adam state) of a small model -> a larger one
  config/       ml_collections defaults and config files -> typed frozen RunConfig
  interop/      Hugging Face safetensors directories <-> growlm params
  train/        the sharded trainer: state, optimizer, loss, evaluation, checkpoints, metrics
  init/         the initialisation seam: resume | grow a source | fresh init
  commands      the library form of every command (train, grow, HF grow/train/export)
  experiments/  sweeps as config code, the launcher, analysis of grown vs scratch runs
  cli/          absl entry points (growlm.main, growlm.grow_main, growlm.hf_main, growlm.demo,
                growlm.prepare, growlm.sample)

docs/design.md describes the architecture and the mathematics of exact growth.
"""

__version__ = "0.1.0"
