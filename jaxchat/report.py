"""The report card of a run: `python -m jaxchat.report reset|generate [--gpu_hourly_rate R]` (nanochat's commands).

`reset` (the launcher runs it before a pipeline) removes an earlier run's sections and records the header: git,
hardware, software, lines of code, the config that runs. `generate` (after it) renders `report/report.md` from the
sections the stages logged, with plots and the summary, and copies it to the working directory. What a report holds
and how it is rendered: `jaxchat.report_card`.
"""
import argparse

from jaxchat.distributed import run_main
from jaxchat.report_card import DEFAULT_RATE, HOURLY_RATES, get_report


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["reset", "generate"])
    p.add_argument("--gpu_hourly_rate", "--gpu-hourly-rate", type=float, default=None,
                   help="dollars per device-hour for the cost (default: by device kind: "
                        + ", ".join(f"{k} ${v:.2f}" for k, v in HOURLY_RATES.items()) + f", else ${DEFAULT_RATE:.2f})")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = get_report()
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.dir}")
        return
    path, summary = report.generate(args.gpu_hourly_rate)
    print(f"{summary}\n\nreport written to {path} (and ./report.md)")


if __name__ == "__main__":
    run_main(main)
