"""The whole pipeline: `python -m jaxchat.launch --config=NAME [--key=value ...]`.

A config (`jaxchat/configs/NAME.toml`, shipped in the package, or a path) lists the stages to run, in order, and
the flags of each stage in a table named after it; `--stages=a,b` runs only some of them (e.g. `--stages=base_train
--resume=1`). Overrides on the command line: `--stage.key=value` for one stage, or `--key=value` for every stage of
the config that has that flag. Every key, the type of every value and its range are checked against the stage's
own flags before anything runs (`jaxchat.pipeline`: a config's `depth = "4"` is refused).
A whole pipeline starts a new report card and ends by writing it (`$JAXCHAT_BASE_DIR/report/report.md`, copied to
./report.md); `--stages` adds its stages to the current one.
"""
import argparse
import importlib
import time

from jaxchat import distributed
from jaxchat.common import UserError, non_negative_float
from jaxchat.distributed import run_main
from jaxchat.pipeline import STAGES, load_config, plan
from jaxchat.report_card import get_report


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
    stages = plan(config, rest)
    commands = [f"python -m {STAGES[stage]} {' '.join(stage_args)}".strip() for stage, stage_args in stages]
    report = get_report()
    if not args.stages or report.header() is None:  # a whole pipeline starts a new report; --stages adds to one
        report.reset(args.config, commands, rest)
    t_start = time.time()
    for (stage, stage_args), command in zip(stages, commands):
        print(f"\n=== {stage}: {command}", flush=True)
        t0 = time.time()
        importlib.import_module(STAGES[stage]).main(stage_args)
        print(f"=== {stage} done in {time.time() - t0:.1f}s", flush=True)
    path, summary = report.generate(args.gpu_hourly_rate)
    print(f"\npipeline {args.config} done in {time.time() - t_start:.1f}s\n\n{summary}\n\nreport: {path} "
          f"(and ./report.md)")


if __name__ == "__main__":
    run_main(main)
