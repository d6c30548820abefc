"""The model: one decoder-only transformer in GPT-2 or Llama style.

  config.py    ModelConfig (frozen): sizes, style fields, dtypes; the named sizes and styles
  decoder.py   the Flax modules; every parameter declares its logical axes
  attention.py the attention kernels behind `model.attention` (naive, xla, cudnn, splash)
  speed.py     what `model.remat` and `model.scan_unroll` stand for on each platform
  splash.py    the TPU splash-attention kernel, wrapped for the device mesh
  flops.py     training FLOPs per token (PaLM convention, docs/design.md)

The public functions are re-exported here: `model.init_params(cfg, rng)`,
`model.apply(cfg, params, tokens_BxL)`, `model.hidden(cfg, params, tokens_BxL)` (everything but
the output layer), `model.abstract_params(cfg)`.
"""

from growlm.model.config import ModelConfig, make_model_config
from growlm.model.decoder import (AXES, abstract_params, apply, count_params, hidden,
                                  init_params)

__all__ = ["AXES", "ModelConfig", "abstract_params", "apply", "count_params", "hidden",
           "init_params", "make_model_config"]
