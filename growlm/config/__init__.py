"""Run configuration: ml_collections ConfigDicts for people, typed frozen objects for the code.

  defaults.py  base_config(size, style): every field with a one-line comment; parse_arg
  files.py     loading a config file (PATH[:ARG]) and applying --config.FIELD=VALUE overrides
  typed.py     resolve(ConfigDict) -> RunConfig, validated once and frozen; config.json form

Only the command line and the sweep layer see ConfigDicts; library functions take RunConfig.
"""
