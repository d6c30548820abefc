"""Command line: `python -m growlm.sample --workdir=RUN (or --hf=HF_DIR) --prompt=TEXT`.

Prints each prompt with its continuation(s): greedy by default (--temperature=0), or sampled
with --temperature, --top_k and --top_p (seeded by --seed). The model runs jitted with a
key/value cache (growlm.model.generate); a run dir gives its newest checkpoint and its
data.tokenizer, an HF directory its weights and tokenizer.json.

  python -m growlm.sample --workdir=runs/tiny --prompt='def main(' --max_new_tokens=80
  python -m growlm.sample --hf=HF_DIR --prompt='import os' --temperature=0.8 --top_p=0.95 \\
      --num_samples=3
"""

from __future__ import annotations

from absl import app, flags

from growlm.cli import flags as cli_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A growlm run directory (newest checkpoint).")
_HF = flags.DEFINE_string("hf", None, "A Hugging Face model directory (with tokenizer.json).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Text to continue (repeat for several).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: the smallest set reaching this mass (1: all).")
_NUM = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the draws.")


def main(argv):
  del argv  # flags only (cli_flags.flags_only)
  cli_flags.setup_logging()

  def go():
    from growlm import commands  # pylint: disable=g-import-not-at-top  (after flags: jax is slow)
    return commands.sample(_PROMPT.value or [], workdir=_WORKDIR.value, hf=_HF.value,
                           max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                           top_k=_TOP_K.value, top_p=_TOP_P.value, num_samples=_NUM.value,
                           seed=_SEED.value)

  results = cli_flags.guarded(go)
  for prompt, texts in zip(_PROMPT.value, results):
    for i, text in enumerate(texts):
      label = f" (sample {i + 1} of {len(texts)})" if len(texts) > 1 else ""
      print(f"--- prompt{label}: {prompt!r}")
      print(prompt + text)


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli_flags.flags_only(cli_flags.plain_flags_parser))


if __name__ == "__main__":
  run()
