"""The model: one decoder-only transformer in GPT-2 or Llama style.

  config.py    ModelConfig (frozen): sizes, style fields, dtypes; the named sizes and styles
  decoder.py   the Flax modules; every parameter declares its logical axes
  flops.py     training FLOPs per token (PaLM convention, docs/design.md)

The public functions are re-exported here: `model.init_params(cfg, rng)`,
`model.apply(cfg, params, tokens_BxL)`, `model.abstract_params(cfg)`.
"""

from growlm.model.config import ModelConfig, make_model_config
from growlm.model.decoder import AXES, abstract_params, apply, count_params, init_params

__all__ = ["AXES", "ModelConfig", "abstract_params", "apply", "count_params", "init_params",
           "make_model_config"]
