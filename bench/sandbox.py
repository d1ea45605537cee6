"""Per-execution cost of jaxchat's code sandbox (RL rollouts and HumanEval run many small programs).

    python bench/sandbox.py [--runs 50] [--threads 1]

Times `execute_code` on an empty program and on a HumanEval-sized one (a function and a few asserts), in the kernel
boundary (bubblewrap) and in the weak sandbox, beside the floor: the bare interpreter started the same way
(`python -I -S -c pass`). Prints the median and 90th percentile per execution in milliseconds, and throughput with
--threads running at once.
"""
import argparse
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from jaxchat.execution import SANDBOXES, _interpreter, boundary_problem, execute_code

SMALL_PROGRAM = '''
def below_zero(operations):
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False

assert below_zero([1, 2, -4, 5]) is True
assert below_zero([1, 2, 3]) is False
print("ok")
'''


def timed(fn, runs, threads):
    """Per-call latencies (ms) and calls per second with `threads` calls in flight."""
    def one(_):
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)

    fn()  # warm the page cache
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        latencies = sorted(pool.map(one, range(runs)))
    return latencies, runs / (time.perf_counter() - start)


def report(name, latencies, rate):
    p90 = latencies[int(0.9 * (len(latencies) - 1))]
    print(f"{name:<28}{statistics.median(latencies):>10.1f}{p90:>10.1f}{rate:>12.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    why = boundary_problem()
    sandboxes = [s for s in SANDBOXES if s != "boundary" or why is None]
    if why:
        print(f"kernel boundary unavailable here: {why}")
    print(f"{'':<28}{'median ms':>10}{'p90 ms':>10}{'runs/s':>12}   ({args.runs} runs, {args.threads} threads)")
    python = _interpreter()
    report("bare python -I -S", *timed(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True),
                                      args.runs, args.threads))
    for sandbox in sandboxes:
        for label, code in (("empty", "pass"), ("HumanEval-sized", SMALL_PROGRAM)):
            def run(code=code, sandbox=sandbox):
                assert execute_code(code, sandbox=sandbox).success
            report(f"{sandbox}: {label}", *timed(run, args.runs, args.threads))


if __name__ == "__main__":
    main()
