"""Run model-written Python in a separate, constrained process.

Used by the engine's python tool and by code evaluations (HumanEval). The code runs in a fresh
`python -I` child process, in a throw-away working directory, with a scrubbed environment, no
stdin, a wall-time limit (the whole process group is killed), CPU/memory/file-size rlimits, a cap
on captured output, and a small prelude that disables the os/shutil/subprocess/socket functions a
model most often reaches for by mistake (spawning processes, deleting files, opening connections).

This is a guard against ACCIDENTS by a small model: infinite loops, memory blow-ups, output
floods, `rm -rf`, fork bombs. It is NOT a security boundary against a determined attacker. The
guards are plain Python monkeypatching (`import _posixsubprocess`, `_socket`, `ctypes` and many
other routes get around them) plus rlimits. Running untrusted code safely needs a real boundary:
a container, VM, gVisor or seccomp, with no network and a read-only filesystem.
"""
import contextlib
import dataclasses
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time

_MAX_FILE_BYTES = 64 * 1024 * 1024  # RLIMIT_FSIZE: a runaway write loop cannot fill the disk

# Runs in the child before the user's code. Everything lives inside _sandbox_main, and the user's
# code gets a brand-new __main__ module, so no guard name is visible in its namespace.
_PRELUDE = r'''
import sys

def _sandbox_main():
    import builtins, linecache, os, resource, shutil, socket, subprocess, types
    path, mem, cpu, fsize = sys.argv[1], *map(int, sys.argv[2:5])
    with open(path, encoding="utf-8", errors="surrogatepass") as f:
        src = f.read()
    os.unlink(path)  # the working directory starts empty
    sys.argv = ["<llm>"]

    # Kernel-enforced limits: they hold even where the Python-level guards below are bypassed.
    if mem > 0:
        for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            resource.setrlimit(limit, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    # os.putenv stays: numpy calls it on import, and with no way to start a process (the only
    # reader of the real environment) it cannot do harm; the environment is scrubbed anyway.
    def blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refuse

    for name in ("fork", "forkpty", "system", "popen", "execl", "execle", "execlp", "execlpe",
                 "execv", "execve", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "kill", "killpg", "remove", "unlink", "rmdir", "removedirs",
                 "rename", "renames", "replace", "truncate", "chdir", "fchdir", "chroot", "chmod",
                 "fchmod", "lchmod", "chown", "fchown", "lchown", "setuid", "setgid"):
        if hasattr(os, name):
            setattr(os, name, blocked("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, blocked("shutil." + name))
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, blocked(name))

    # Subclasses rather than plain functions, so modules that subclass these at import time
    # (ssl.SSLSocket subclasses socket.socket) still import; only instantiation is refused.
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    class NoPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError("subprocess is disabled in the sandbox")

    socket.socket = NoSocket
    for name in ("socketpair", "fromfd", "create_connection", "create_server"):
        setattr(socket, name, blocked("socket." + name))
    subprocess.Popen = NoPopen  # run/call/check_output/getoutput all go through Popen

    # Poisoned last: the guard itself needed resource.
    for name in ("resource", "psutil", "ipdb", "joblib", "tkinter", "_posixsubprocess", "pty"):
        sys.modules[name] = None

    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    linecache.cache["<llm>"] = (len(src), None, src.splitlines(True), "<llm>")  # tracebacks show source
    exec(compile(src, "<llm>", "exec"), main.__dict__)

_sandbox_main()
'''


@dataclasses.dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self):
        fields = [f"success={self.success}", f"stdout={self.stdout!r}", f"stderr={self.stderr!r}"]
        fields += [f"{k}={getattr(self, k)!r}" for k in ("error", "timeout", "memory_exceeded") if getattr(self, k)]
        return f"ExecutionResult({', '.join(fields)})"


def _collect(proc, deadline, limit):
    """Read stdout/stderr incrementally until both close, the deadline passes or one exceeds limit."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    timed_out = overflow = False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not overflow:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk  # at most limit + one chunk is ever held
                if len(buf) > limit:
                    del buf[limit:]
                    overflow = True
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), timed_out, overflow


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = 256 * 1024 * 1024,
                 max_output_bytes: int = 64 * 1024) -> ExecutionResult:
    """Run `code` in a sandboxed child Python process and report what happened."""
    with tempfile.TemporaryDirectory(prefix="jaxchat-exec-", ignore_cleanup_errors=True) as workdir:
        # The code travels as a file (read and deleted by the prelude), so any quotes, backslashes
        # or unicode survive untouched and there is no command-line length limit.
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        argv = [sys.executable, "-I", "-u", "-X", "utf8", "-c", _PRELUDE, path,
                str(maximum_memory_bytes or 0), str(math.ceil(timeout) + 1), str(_MAX_FILE_BYTES)]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        deadline = time.monotonic() + timeout
        with subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as proc:
            try:
                out, err, timed_out, overflow = _collect(proc, deadline, max_output_bytes)
                if not (timed_out or overflow):
                    try:  # both pipes closed, yet the child may still be running
                        proc.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        timed_out = True
            finally:
                if proc.returncode is None:  # kill only while unreaped, so the pid cannot be reused
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: the group id is the child's pid
                    proc.wait()

    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    timed_out = timed_out or proc.returncode == -signal.SIGXCPU  # CPU rlimit as the backup
    success = proc.returncode == 0 and not timed_out and not overflow
    memory_exceeded = not success and "MemoryError" in stderr
    error = None
    if timed_out:
        error = f"timed out after {timeout} s"
    elif memory_exceeded:
        error = f"MemoryError: memory limit exceeded ({maximum_memory_bytes} bytes)"
    elif overflow:
        error = f"output exceeded {max_output_bytes} bytes: truncated and the process was killed"
    elif not success:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else f"exited with code {proc.returncode}"
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded)
