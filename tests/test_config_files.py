"""Config files and --config overrides: loading, field errors with hints, value parsing, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from conftest import REPO
from growlm.config import files
from growlm.errors import GrowlmError

DEFAULT = str(REPO / "configs" / "default.py")


def _default():
  return files.load(f"{DEFAULT}:size=nano,runlocal")


def _error(fn, *args, **kwargs) -> str:
  """The message of the GrowlmError that fn raises, checked to be one line."""
  with pytest.raises(GrowlmError) as e:
    fn(*args, **kwargs)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_split_spec():
  assert files.split_spec("configs/default.py:size=nano,runlocal") == (
      "configs/default.py", "size=nano,runlocal")
  assert files.split_spec("configs/default.py") == ("configs/default.py", None)
  assert files.split_spec("configs/default.py:") == ("configs/default.py", None)


def test_load_equals_get_config_and_is_unlocked():
  sys.path.insert(0, str(REPO))
  from configs import default  # pylint: disable=g-import-not-at-top
  cfg = _default()
  assert cfg.to_dict() == default.get_config("size=nano,runlocal").to_dict()
  assert cfg.train.num_steps == 20 and not cfg.is_locked


@pytest.mark.parametrize("source,words", [
    (None, ["no such file", "accepted"]),
    ("dir", ["is a directory"]),
    ("x = 1\ndef get_config(arg=None)\n  return 1\n", ["syntax error", ":2"]),
    ("import growlm_no_such_module\n", ["ModuleNotFoundError", "growlm_no_such_module"]),
    ("raise RuntimeError('first line\\nsecond line')\n", ["RuntimeError: first line second"]),
    # ml_collections says what is wrong at the end of a message of several lines
    ("import ml_collections\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict("
     "{'stages': ()})\n  c.stages = {'step': 3,\n 'model': {}}\n  return c\n",
     ["TypeError", "Could not override field 'stages'", "cannot be casted to type"]),
    ("raise RuntimeError('x' * 5000)\n", ["RuntimeError: xxx", "x ..."]),
    ("def get_config(arg=None):\n  raise KeyError('size')\n", ["get_config", "KeyError",
                                                                "'size'"]),
    ("def sweep(add):\n  pass\n", ["defines no get_config"]),
    ("def get_config(arg=None):\n  return 3\n", ["returned int", "ConfigDict"]),
])
def test_load_errors_are_one_line(tmp_path, source, words):
  path = tmp_path / "cfg.py"
  if source == "dir":
    path.mkdir()
  elif source is not None:
    path.write_text(source)
  msg = _error(files.load, f"{path}:arg")
  assert str(path) in msg and "\n" not in msg and len(msg) < 700
  for w in words:
    assert w in msg, msg


def test_growlm_error_from_get_config_passes_through():
  assert _error(files.load, f"{DEFAULT}:size=huge").startswith("model size 'huge' unknown")


def test_get_config_without_arg_and_dict_result(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("def get_config():\n  return {'train': {'num_steps': 4}}\n")
  cfg = files.load(str(path))
  assert isinstance(cfg, ml_collections.ConfigDict) and cfg.train.num_steps == 4


def test_unknown_fields_name_a_close_match_or_the_accepted_fields():
  cfg = _default()
  msg = _error(files.set_field, cfg, "train.num_step", 3, what="--config")
  assert "'train.num_step' does not exist" in msg and "did you mean 'train.num_steps'?" in msg
  assert "did you mean 'train.num_steps'?" in _error(files.apply_overrides, cfg,
                                                     {"trian.num_steps": "3"})
  msg = _error(files.apply_overrides, cfg, {"train.zzz": "3"})
  assert "did you mean" not in msg and "num_steps" in msg and "warmup_steps" in msg
  assert "accepted fields of the config" in _error(files.apply_overrides, cfg, {"qqq": "1"})
  # Free-form is data.eval only: a new mesh axis is still a misspelling.
  assert "does not exist" in _error(files.apply_overrides, cfg, {"mesh.expert": "2"})
  assert "not a section" in _error(files.apply_overrides, cfg, {"train.num_steps.x": "2"})
  assert cfg.train.num_steps == 20  # nothing was set by the refused overrides


def test_data_eval_takes_new_names_even_when_locked():
  assert files.FREE_FORM == ("data.eval",)
  cfg = _default()
  cfg.lock()
  files.apply_overrides(cfg, {"data.eval.wiki": "file:/tmp/w.txt@all"})
  assert cfg.data.eval.to_dict() == {"heldout": "train@eval", "wiki": "file:/tmp/w.txt@all"}
  assert cfg.is_locked
  files.set_field(cfg, "data.eval.heldout", "train@all", what="sweep")
  assert cfg.data.eval.heldout == "train@all"
  assert "takes a string" in _error(files.set_field, cfg, "data.eval.x", 3, what="sweep")


@pytest.mark.parametrize("text,value", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("t", True),
    ("false", False), ("False", False), ("0", False), ("no", False)])
def test_bool_words(text, value):
  assert files.parse_value(False if value else True, text, "log.progress_bar") is value


def test_bool_refuses_other_words():
  msg = _error(files.parse_value, True, "maybe", "log.progress_bar")
  assert "'log.progress_bar'" in msg and "true, false" in msg


def test_int_and_float():
  assert files.parse_value(1, "-1", "mesh.data") == -1
  assert files.parse_value(1, "1_000", "x") == 1000
  for bad in ("1.5", "true", "", "1e3"):
    assert "takes an integer" in _error(files.parse_value, 1, bad, "train.num_steps")
  assert files.parse_value(0.1, "3", "train.lr") == 3.0
  assert files.parse_value(0.1, "1e-3", "train.lr") == 1e-3
  assert "takes a number" in _error(files.parse_value, 0.1, "fast", "train.lr")
  cfg = _default()
  files.apply_overrides(cfg, {"train.lr": "1", "train.num_steps": "7"})
  assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.num_steps == 7


@pytest.mark.parametrize("text,value", [
    ("(a,b,)", ("a", "b")), ("(a,)", ("a",)), ("()", ()), ("", ()), ("[a,b]", ("a", "b")),
    ("a,b", ("a", "b")), ("a", ("a",)), ("(1,3,)", (1, 3)), ("('x', 'y')", ("x", "y")),
    ("(1,b)", (1, "b")), ("((batch,(data,fsdp)),)", (("batch", ("data", "fsdp")),)),
    ("(('batch', ('data', 'fsdp')), ('embed', 'fsdp'))",
     (("batch", ("data", "fsdp")), ("embed", "fsdp")))])
def test_tuple_forms(text, value):
  assert files.parse_value((), text, "wandb.tags") == value


def test_strings_stay_as_given_and_none_reads_literals():
  assert files.parse_value("", "(a,b)", "init.source") == "(a,b)"
  assert files.parse_value("bytes", "007", "data.tokenizer") == "007"
  assert files.parse_value(None, "3", "x") == 3
  assert files.parse_value(None, "abc", "x") == "abc"


def test_sections_take_dicts_only():
  cfg = _default()
  files.apply_overrides(cfg, {"mesh": "{'data': 2, 'fsdp': 1, 'tensor': 4}"})
  assert cfg.mesh.to_dict() == {"data": 2, "fsdp": 1, "tensor": 4}
  files.set_field(cfg, "mesh", {"data": 1, "fsdp": 1, "tensor": 1}, what="sweep")
  assert cfg.mesh.tensor == 1
  assert "is a section" in _error(files.apply_overrides, cfg, {"train": "3"})
  assert "is a section" in _error(files.set_field, cfg, "train", 3, what="sweep")


def test_typed_values_of_the_wrong_type_are_growlm_errors():
  cfg = _default()
  msg = _error(files.set_field, cfg, "train.num_steps", "many", what="sweep run 'a'")
  assert msg.startswith("sweep run 'a': ") and "takes an integer" in msg
  files.set_field(cfg, "train.lr", 2, what="sweep")  # an int for a float field is fine
  assert cfg.train.lr == 2.0


def test_sweep_commands_parse_back_to_the_sweep_configs(tmp_path):
  from growlm.experiments import sweep  # pylint: disable=g-import-not-at-top
  paper = str(REPO / "configs" / "paper.py")
  for run in sweep.expand(paper, str(tmp_path / "p")):
    overrides = {}
    for arg in sweep.command(paper, run):
      if arg.startswith("--config."):
        key, _, value = arg[len("--config."):].partition("=")
        overrides[key] = value
    cfg = files.load(paper)
    files.apply_overrides(cfg, overrides)
    assert cfg.to_dict() == run.config.to_dict(), run.name


_SCRIPT = """
from absl import app
from growlm.cli import flags as cli_flags

def main(argv):
  c = cli_flags.config()
  print("steps", None if c is None else c.train.num_steps,
        None if c is None else sorted(c.data.eval), argv[1:])

if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.config_flags_parser)
"""


@pytest.fixture(name="cli")
def _cli(tmp_path):
  """Runs a tiny absl program that uses config_flags_parser; a fast (no JAX) config file."""
  script = tmp_path / "prog.py"
  script.write_text(_SCRIPT)
  (tmp_path / "small.py").write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        return ml_collections.ConfigDict({"train": {"num_steps": 5, "lr": 0.1},
                                          "log": {"progress_bar": True},
                                          "data": {"eval": {"heldout": "train@eval"}}})
      """))
  env = {**os.environ, "PYTHONPATH": str(REPO)}

  def run(*args):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)
  return run, str(tmp_path / "small.py")


def _one_error_line(p) -> str:
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr)
  assert lines[0].startswith("growlm: error: ") and "Traceback" not in p.stderr
  return lines[0]


def test_cli_good_arguments(cli):
  run, small = cli
  p = run(f"--config={small}", "--config.train.num_steps=7", "--config.data.eval.wiki=file:w@all",
          "pos", "--config.log.progress_bar", "--config.train.lr", "0.5")
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == "steps 7 ['heldout', 'wiki'] ['pos']"
  assert run().stdout.strip() == "steps None None []"


def test_cli_real_config_file(cli):
  run, _ = cli
  p = run("--config", "configs/default.py:size=nano,runlocal", "--config.train.num_steps=3")
  assert p.returncode == 0 and p.stdout.strip() == "steps 3 ['heldout'] []", p.stderr


def test_cli_errors_are_one_line_with_exit_2(cli):
  run, small = cli
  assert "no such file" in _one_error_line(run("--config=missing.py"))
  line = _one_error_line(run(f"--config={small}", "--config.train.num_step=3"))
  assert "did you mean 'train.num_steps'?" in line
  assert "takes an integer" in _one_error_line(run(f"--config={small}",
                                                   "--config.train.num_steps=1.5"))
  assert "nope" in _one_error_line(run(f"--config={small}", "--nope=1"))
  assert "without --config=FILE" in _one_error_line(run("--config.train.num_steps=3"))
  line = _one_error_line(run(f"--config={DEFAULT}:size=huge"))
  assert "model size 'huge' unknown" in line


def test_cli_help_still_works(cli):
  run, _ = cli
  p = run("--helpfull", "--config=missing.py")
  assert p.returncode in (0, 1) and "Config file PATH[:ARG]" in p.stdout + p.stderr
  assert "growlm: error" not in p.stderr


def test_a_run_dir_written_before_a_field_existed_still_resumes():
  """config.json from before model.qkv_bias, init.plan.layer_ranges and data.text_field existed:
  resuming with their defaults is no conflict; asking for another value is, and so is any other
  change."""
  import copy  # pylint: disable=g-import-not-at-top
  from growlm.config import defaults  # pylint: disable=g-import-not-at-top
  from growlm.config.resume import resume_conflicts  # pylint: disable=g-import-not-at-top
  from growlm.config.typed import resolve  # pylint: disable=g-import-not-at-top
  current = resolve(defaults.base_config("nano")).to_json()
  old = copy.deepcopy(current)
  del old["model"]["qkv_bias"]
  del old["init"]["plan"]["layer_ranges"]
  del old["data"]["text_field"]
  assert resume_conflicts(old, current) == []
  changed = copy.deepcopy(current)
  changed["model"]["qkv_bias"] = True
  changed["init"]["plan"]["layer_ranges"] = [[0, 1], [0, 2]]
  changed["data"]["text_field"] = "content"
  assert resume_conflicts(old, changed) == ["data.text_field", "init.plan.layer_ranges",
                                            "model.qkv_bias"]
  older = copy.deepcopy(old)
  del older["train"]["lr"]                       # not a model or plan field: still a conflict
  assert resume_conflicts(older, current) == ["train.lr"]
  # The speed fields may change on resume; logits_dtype, newer than some run dirs, too.
  speedy = copy.deepcopy(current)
  speedy["model"].update(logits_dtype="compute", remat="full", loss_chunk=8, scan_unroll=2)
  del old["model"]["logits_dtype"]
  assert resume_conflicts(old, speedy) == resume_conflicts(current, speedy) == []
