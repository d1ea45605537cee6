"""A pipeline's config: `jaxchat/configs/NAME.toml` (shipped in the package) or a path.

A config lists the stages to run, in order, and the flags of each stage in a table named after it. Overrides from a
command line: `--stage.key=value` for one stage, or `--key=value` for every stage of the config that has that flag.
Every key, the type of every value and its range are checked against the stage's own flags before anything runs (a
config's `depth = "4"` is refused: TOML has numbers, and a quoted one is a slip). `python -m jaxchat.launch` runs a
config; `python -m jaxchat.memory` reads base_train's flags from one.
"""
import argparse
import functools
import importlib
import os
import tomllib

from jaxchat.common import UserError

# stage name -> module; each module has build_parser() and main(argv), and runs alone as `python -m jaxchat.<module>`
STAGES = {"data": "jaxchat.dataset", "tok_train": "jaxchat.tok_train", "tok_eval": "jaxchat.tok_eval",
          "base_train": "jaxchat.base_train", "base_eval": "jaxchat.base_eval", "mid_train": "jaxchat.mid_train",
          "chat_sft": "jaxchat.chat_sft", "chat_rl": "jaxchat.chat_rl", "chat_eval": "jaxchat.chat_eval"}
# inside the package, so that `--config=tiny` works from any directory after a plain `pip install .`
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def load_config(name):
    path = name if name.endswith(".toml") else os.path.join(CONFIG_DIR, name + ".toml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml")) if os.path.isdir(CONFIG_DIR) else []
        raise UserError(f"no config {name!r} ({path}); known configs: {', '.join(known)}")
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config {path}: {e}") from None
    stages = config.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"config {path}: 'stages' must be a non-empty list of stage names ({', '.join(STAGES)})")
    for stage in list(stages) + [k for k in config if k != "stages"]:
        if stage not in STAGES:
            raise UserError(f"config {path}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if stage in config and not isinstance(config[stage], dict):
            raise UserError(f"config {path}: {stage} must be a table of flags ([{stage}]), not {config[stage]!r}")
    return config


def stage_parser(stage):
    """The stage's own argparse parser. The one place the library reaches a command: by name, for its flags."""
    return importlib.import_module(STAGES[stage]).build_parser()


@functools.cache  # every override consults it; build each stage's parser once
def stage_flags(stage):
    """{dest: argparse action} of a stage's flags."""
    return {a.dest: a for a in stage_parser(stage)._actions if a.option_strings and a.dest != "help"}


def check_value(stage, key, value, flags, command_line=False):
    """The value converted to the type of the stage's flag (int, float or str) and checked by it (its range:
    `common.number`), or one line naming stage.key.

    Command-line values arrive as strings and must parse as that type; a config's values arrive typed by TOML and
    must already have it: no string for a number (`depth = "4"`), no float for an int, no number for a string, no
    list or table. A TOML bool is always refused: on/off flags are ints (1 or 0), and reading true as 1 would turn a
    slip such as `num_iterations = true` into a one-step run instead of an error."""
    if key not in flags:
        raise UserError(f"unknown key {stage}.{key}; valid keys for {stage}: {', '.join(sorted(flags)) or '(none)'}")
    action = flags[key]
    parse = action.type or str  # argparse's default type is the string itself
    kind = getattr(parse, "kind", parse)  # a ranged flag's type (common.number) names its int or float
    shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as written in TOML: true, not True

    def wrong(hint=""):
        return UserError(f"{stage}.{key}={shown}: expected {kind.__name__}{hint}")

    if isinstance(value, bool):  # before the int case: bool is a subclass of int
        raise wrong(": write 1 or 0, not true/false" if kind is int else "")
    if isinstance(value, str) and kind is not str and not command_line:
        raise wrong(", a TOML number: write it without quotes")
    if not isinstance(value, (str, kind)) and not (kind is float and isinstance(value, int)):
        raise wrong(" (in quotes)" if kind is str else "")
    try:
        value = parse(value)
    except ValueError:
        raise wrong() from None
    except argparse.ArgumentTypeError as e:  # out of the flag's range
        raise UserError(f"{stage}.{key}={shown}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{stage}.{key}={value!r}: expected one of {', '.join(map(str, action.choices))}")
    return value


def parse_overrides(args, config):
    """--stage.key=value or --key=value (every configured stage with that flag) -> {stage: {key: value}}, each
    value converted to (and checked against) its stage's flag."""
    out = {stage: {} for stage in config["stages"]}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"override {arg!r} must look like --key=value or --stage.key=value")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if "." in key:
            stage, key = key.split(".", 1)
            if stage not in out:
                raise UserError(f"override {arg!r}: stage {stage!r} is not in this config ({', '.join(out)})")
            out[stage][key] = check_value(stage, key, value, stage_flags(stage), command_line=True)
            continue
        hits = [s for s in out if key in stage_flags(s)]
        if not hits:
            valid = sorted({k for s in out for k in stage_flags(s)})
            raise UserError(f"unknown key {key!r}; valid keys: {', '.join(valid)}")
        for stage in hits:
            out[stage][key] = check_value(stage, key, value, stage_flags(stage), command_line=True)
    return out


def stage_argv(stage, settings):
    flags = stage_flags(stage)
    argv = []
    for key, value in settings.items():
        value = check_value(stage, key, value, flags)
        option = next(o for o in flags[key].option_strings if o.startswith("--"))  # "-i=x" would mean "=x"
        argv.append(f"{option}={value}")
    return argv


def plan(config, args):
    """[(stage, its argv)] for the config's stages: each stage's table, then the command-line overrides `args`."""
    overrides = parse_overrides(args, config)
    return [(stage, stage_argv(stage, {**config.get(stage, {}), **overrides[stage]})) for stage in config["stages"]]
