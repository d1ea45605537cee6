"""The whole pipeline: `python -m jaxchat.launch --config=NAME [--key=value ...]`.

A config (`jaxchat/configs/NAME.toml`, shipped in the package, or a path) lists the stages to run, in order, and
the flags of each stage in a table named after it; `--stages=a,b` runs only some of them (e.g. `--stages=base_train
--resume=1`). Overrides on the command line: `--stage.key=value` for one stage, or `--key=value` for every stage of
the config that has that flag. Every key, the type of every value and its range are checked against the stage's
own flags before anything runs (a config's `depth = "4"` is refused: TOML has numbers, and a quoted one is a slip).
A whole pipeline starts a new report card and ends by writing it (`$JAXCHAT_BASE_DIR/report/report.md`, copied to
./report.md); `--stages` adds its stages to the current one.
"""
import argparse
import functools
import importlib
import os
import time
import tomllib

from jaxchat import distributed
from jaxchat.common import UserError, non_negative_float, run_main
from jaxchat.report import get_report

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


@functools.cache  # every override consults it; build each stage's parser once
def stage_flags(stage):
    """{dest: argparse action} of a stage's flags."""
    parser = importlib.import_module(STAGES[stage]).build_parser()
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="a name in jaxchat/configs/ (tiny, d20, ...) or a path to a .toml file")
    parser.add_argument("--stages", default="", help="run only these of the config's stages, e.g. base_train,base_eval")
    parser.add_argument("--gpu_hourly_rate", "--gpu-hourly-rate", type=non_negative_float, default=None,
                        help="dollars per device-hour for the report's cost (default: by device kind)")
    distributed.add_flags(parser)  # read by run_main before this parser (listed here for --help)
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config)
    if args.stages:
        chosen = args.stages.split(",")
        if unknown := [s for s in chosen if s not in config["stages"]]:
            raise UserError(f"--stages: {unknown} not in config {args.config} ({', '.join(config['stages'])})")
        config["stages"] = [s for s in config["stages"] if s in chosen]
    overrides = parse_overrides(rest, config)
    plan = [(stage, stage_argv(stage, {**config.get(stage, {}), **overrides[stage]})) for stage in config["stages"]]
    commands = [f"python -m {STAGES[stage]} {' '.join(stage_args)}".strip() for stage, stage_args in plan]
    report = get_report()
    if not args.stages or report.header() is None:  # a whole pipeline starts a new report; --stages adds to one
        report.reset(args.config, commands, rest)
    t_start = time.time()
    for (stage, stage_args), command in zip(plan, commands):
        print(f"\n=== {stage}: {command}", flush=True)
        t0 = time.time()
        importlib.import_module(STAGES[stage]).main(stage_args)
        print(f"=== {stage} done in {time.time() - t0:.1f}s", flush=True)
    path, summary = report.generate(args.gpu_hourly_rate)
    print(f"\npipeline {args.config} done in {time.time() - t_start:.1f}s\n\n{summary}\n\nreport: {path} "
          f"(and ./report.md)")


if __name__ == "__main__":
    run_main(main)
