"""Running stages on several local processes from the tests, and the driver each process runs.

    run_group(spec, base_dir, processes=2, devices=4)  ->  [what each stage's main returned], on process 0

`spec` = [[stage, [flags...]], ...] (stage: a name of jaxchat.pipeline.STAGES): every process runs the stages in
order, in one Python process, as `run_main` runs one; process 0 writes what each stage's main returned to a JSON
file. One process: `python tests/_multiprocess.py OUT SPEC` with `devices` fake CPU devices; several:
`launch/local.sh N` around the same command (the launcher under test). Every group has an outer timeout: a group
that hangs or aborts fails its test.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def group_env(base_dir, processes, devices, extra=None):
    env = {**os.environ, "JAXCHAT_BASE_DIR": str(base_dir), "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "JAXCHAT_DISTRIBUTED_TIMEOUT": "20", **(extra or {})}
    env.pop("XLA_FLAGS", None)
    if processes == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        for key in ("JAXCHAT_COORDINATOR", "JAXCHAT_NUM_PROCESSES", "JAXCHAT_PROCESS_ID"):
            env.pop(key, None)
    else:
        env["DEVICES_PER_PROCESS"] = str(devices)
    return env


def run_group(spec, base_dir, processes, devices, timeout=420, extra_env=None):
    fd, out = tempfile.mkstemp(prefix=f"results_{processes}x{devices}_", suffix=".json", dir=str(base_dir))
    os.close(fd)
    command = [sys.executable, os.path.abspath(__file__), out, json.dumps(spec)]
    if processes > 1:
        command = [os.path.join(ROOT, "launch", "local.sh"), str(processes)] + command
    proc = subprocess.Popen(command, env=group_env(base_dir, processes, devices, extra_env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{processes}×{devices} group timed out after {timeout}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{processes}×{devices} group failed (rc {proc.returncode}):\n{output[-4000:]}"
    with open(out) as f:
        return json.load(f)  # an empty file (process 0 wrote nothing) fails here


def _main(argv):
    from jaxchat import distributed
    from jaxchat.pipeline import STAGES
    out, spec = argv
    results = [importlib.import_module(STAGES[stage]).main(flags) for stage, flags in json.loads(spec)]
    if distributed.is_writer():
        with open(out, "w") as f:
            json.dump(results, f, default=str)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from jaxchat.distributed import run_main
    run_main(_main)
