"""Fresh processes for the tests: fake CPU devices, several processes, the stages run in them.

    run_python(["-c", SCRIPT], devices=8)       a fresh Python with 8 fake CPU devices -> CompletedProcess
    run_checks(["engine_sharded"])             tests/_multidevice.py's checks on 8 devices -> {check: result}
    run_group(spec, base_dir, processes=2, devices=4)  stages on several processes -> [what each main returned]

XLA fixes its device count when jax is imported (XLA_FLAGS=--xla_force_host_platform_device_count=N), so a test
that needs N devices runs its code in a fresh process with `fresh_env(devices=N)`. A group's `spec` is
[[stage, [flags...]], ...] (stage: a name of jaxchat.pipeline.STAGES): every process runs the stages in order, in
one Python process (this file's `__main__`), as `run_main` runs one; process 0 writes what each stage's main
returned to a JSON file. One process: `python tests/_harness.py OUT SPEC` with `devices` fake CPU devices;
several: `launch/local.sh N` around the same command (the launcher under test). Every run has an outer timeout: a
run that hangs or aborts fails its test.
"""
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
PROCESS_VARIABLES = ("JAXCHAT_COORDINATOR", "JAXCHAT_NUM_PROCESSES", "JAXCHAT_PROCESS_ID")


def fresh_env(devices=None, processes=1, base_dir=None, **extra):
    """The environment of a fresh process: this checkout (and tests/) importable, CPU only, `devices` fake CPU
    devices per process (None: JAX's default of one). Several `processes` share it, each given its own
    JAXCHAT_PROCESS_ID (as launch/local.sh does): a coordinator on a free loopback port and a short distributed
    timeout, so a lost peer fails the test in seconds. `base_dir` as JAXCHAT_BASE_DIR (else the test's own);
    `extra` variables last."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", *PROCESS_VARIABLES)}
    path = [ROOT, TESTS, os.environ.get("PYTHONPATH")]
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, path)))
    if devices is not None:
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", DEVICES_PER_PROCESS=str(devices))
    if processes > 1:
        env.update(JAXCHAT_NUM_PROCESSES=str(processes), JAXCHAT_COORDINATOR=f"127.0.0.1:{free_port()}",
                   JAXCHAT_DISTRIBUTED_TIMEOUT="20")
    if base_dir is not None:
        env["JAXCHAT_BASE_DIR"] = str(base_dir)
    return {**env, **{k: str(v) for k, v in extra.items()}}


def run_python(args, devices=None, timeout=600, cwd=ROOT, **extra):
    """`python ARGS` in a fresh process (`fresh_env(devices, **extra)`); its output captured as text."""
    return subprocess.run([sys.executable, *args], env=fresh_env(devices, **extra), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def run_checks(names=(), timeout=600):
    """Run the named checks of tests/_multidevice.py (all when empty) in one fresh 8-device process; returns
    {check name: result or {"error": traceback}}."""
    out = run_python([os.path.join(TESTS, "_multidevice.py"), *names], devices=8, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_group(spec, base_dir, processes, devices, timeout=420, extra_env=None):
    """Run `spec`'s stages on `processes` processes of `devices` fake CPU devices each; what process 0's stages
    returned."""
    fd, out = tempfile.mkstemp(prefix=f"results_{processes}x{devices}_", suffix=".json", dir=str(base_dir))
    os.close(fd)
    command = [sys.executable, os.path.abspath(__file__), out, json.dumps(spec)]
    if processes > 1:
        command = [os.path.join(ROOT, "launch", "local.sh"), str(processes)] + command
    env = fresh_env(devices, processes, base_dir, **(extra_env or {}))
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{processes}×{devices} group timed out after {timeout}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{processes}×{devices} group failed (rc {proc.returncode}):\n{output[-4000:]}"
    with open(out) as f:
        return json.load(f)  # an empty file (process 0 wrote nothing) fails here


def free_port():
    """A loopback port nobody listens on now (for a coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
