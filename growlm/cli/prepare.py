"""Command line: `python -m growlm.prepare --source=SOURCE --tokenizer=TOKENIZER --out=DIR`.

Tokenizes a source once into array_record token shards plus a manifest (growlm.data.shards),
in parallel worker processes; rerunning the same command resumes an interrupted prepare, or
does nothing when it is complete. Train on the result with
`--config.data.train=prepared:DIR` (evaluation on its eval split: `train@eval`, the default).

  python -m growlm.prepare --source=site-packages --tokenizer=bytes --out=data/site-packages
  python -m growlm.prepare --source='jsonl:corpus/*.jsonl' --text_field=content \\
      --tokenizer=path/to/tokenizer.json --out=data/corpus
"""

from __future__ import annotations

from absl import app, flags

from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError

_SOURCE = flags.DEFINE_string(
    "source", None, "What to tokenize: stdlib | site-packages | file:GLOB[,GLOB] | "
    "jsonl:GLOB[,GLOB] | parquet:GLOB[,GLOB] | tfds:NAME (with --data_dir).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "bytes", "'bytes', a Hugging Face tokenizer.json, a SentencePiece .model, or a "
    "folder holding either.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (new, or this prepare's own).")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.05, "Share held out as the eval split.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text",
                                  "JSONL field, Parquet column or tfds feature holding the text.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir (tfds: sources).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: one per CPU core).")
_PART_MB = flags.DEFINE_float("part_mb", 64, "Source MiB per part (one shard per split each).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def main(argv):
  del argv  # flags only (cli_flags.flags_only)
  cli_flags.setup_logging()

  def go():
    if not _SOURCE.value or not _OUT.value:
      raise GrowlmError("--source=SOURCE and --out=DIR are both required (see --help)")
    from growlm import data  # pylint: disable=g-import-not-at-top
    return data.prepare_tokens(_SOURCE.value, _TOKENIZER.value, _OUT.value,
                               eval_fraction=_EVAL_FRACTION.value, text_field=_TEXT_FIELD.value,
                               data_dir=_DATA_DIR.value, part_mb=_PART_MB.value,
                               workers=_WORKERS.value, progress=_PROGRESS.value)

  manifest = cli_flags.guarded(go)
  splits = manifest["splits"]
  print(f"growlm: prepared {manifest['source']} with {manifest['tokenizer']['spec']} in "
        f"{_OUT.value}: train {splits['train']['n_tokens']:,} tokens "
        f"({len(splits['train']['shards'])} shards), eval {splits['eval']['n_tokens']:,} tokens; "
        f"train on it with --config.data.train=prepared:{_OUT.value}")


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli_flags.flags_only(cli_flags.plain_flags_parser))


if __name__ == "__main__":
  run()
