"""Run model-written Python behind a boundary the kernel enforces.

Used by the engine's python tool (chat CLI, server) and by code evaluations (HumanEval). Two sandboxes:

- "boundary" (the default): bubblewrap (`bwrap`) starts the interpreter in its own PID, network, IPC and UTS
  namespaces, as the unprivileged uid 65534. It sees a read-only /usr and Python's own install, a private 64 MiB
  /tmp, a minimal /dev and its own /proc; nothing else exists: not your home, the checkpoints, /etc, nor a network
  (its own loopback reaches nothing). The kernel limits processes, address space, file size, CPU time and open
  files, and the whole sandbox dies on a wall-clock timeout. A non-root user gets a user namespace for this, and the
  process limit counts that namespace's processes; root runs bwrap without one and drops to uid 65534 before the
  code runs, because the kernel never applies a process limit to uid 0 (a fork bomb would go unbounded). There the
  limit counts every uid-65534 process on the host, so sandboxes running at once share it. Either way a system-call
  filter (`jaxchat.seccomp`) refuses new namespaces, mounts and the kernel objects that hold memory outside these
  limits, and no_new_privs makes setuid programs run without their privileges: nothing inside gets a capability back.
- "weak": the same child process, limits and output handling without namespaces, plus Python-level guards (os.fork,
  os.system, socket, shutil.rmtree... raise PermissionError). A guard against accidents by a small model, NOT against
  a determined one: `posix`, `ctypes` or `_socket` get around it. Only by explicit choice (--unsafe-weak-sandbox).

The boundary needs Linux and bubblewrap (Debian/Ubuntu: apt install bubblewrap), plus either unprivileged user
namespaces (most distributions; a non-root user) or root with CAP_SYS_ADMIN (a VM; not a default Docker container).
Where it cannot be had (macOS, Windows, such containers) `execute_code` refuses with the reason; macOS has no
equivalent here, so code runs there only in the weak sandbox, with your user's full rights.

Either way the code gets only the standard library (`python -I -S`: no site-packages), a scrubbed environment, no
stdin, and at most `max_output_bytes` of captured output.
"""
import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from jaxchat import seccomp
from jaxchat.common import UserError, flag_adder

SANDBOXES = ("boundary", "weak")
SANDBOX_UID = 65534  # "nobody" on Debian-like systems: owns nothing
MAX_FILE_BYTES = 64 * 1024 * 1024  # RLIMIT_FSIZE, and the size of the boundary's private /tmp
MAX_PROCESSES = 16  # RLIMIT_NPROC in the boundary: a fork bomb stops here
MAX_OPEN_FILES = 64

# Runs in the child before the user's code. Everything lives inside _sandbox_main, and the user's
# code gets a brand-new __main__ module, so no guard name is visible in its namespace.
_PRELUDE = r'''
import sys

def _sandbox_main():
    import builtins, linecache, os, resource, types
    path = sys.argv[1]
    mem, cpu, fsize, nproc, nofile, uid, guards = map(int, sys.argv[2:9])
    with open(path, encoding="utf-8", errors="surrogatepass") as f:
        src = f.read()
    os.unlink(path)  # the working directory starts empty
    sys.argv = ["<llm>"]

    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1), resource.RLIMIT_FSIZE: (fsize, fsize),
              resource.RLIMIT_CORE: (0, 0), resource.RLIMIT_NOFILE: (nofile, nofile)}
    if mem > 0:
        limits.update({resource.RLIMIT_AS: (mem, mem), resource.RLIMIT_DATA: (mem, mem)})
    if nproc > 0:
        limits[resource.RLIMIT_NPROC] = (nproc, nproc)
    for kind, value in limits.items():
        resource.setrlimit(kind, value)
    if uid >= 0:  # started as root: become the unprivileged user (this also drops every capability)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if guards:
        _guard_against_accidents()

    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    linecache.cache["<llm>"] = (len(src), None, src.splitlines(True), "<llm>")  # tracebacks show source
    exec(compile(src, "<llm>", "exec"), main.__dict__)


def _guard_against_accidents():
    import builtins, os, shutil, socket, subprocess

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
    for name in ("resource", "psutil", "ipdb", "joblib", "tkinter", "_posixsubprocess", "pty"):
        sys.modules[name] = None

_sandbox_main()
'''


class SandboxUnavailable(UserError):
    """The kernel boundary cannot be had on this system (the message says why and what to do)."""


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


def add_tool_flags(parser):
    """--tool (the calculator or Python in the sandbox) and the sandbox flag, of a command that chats."""
    parser.add_argument("--tool", default="calculator", choices=("calculator", "python"),
                        help="what runs a <|python_start|> block in a reply: nanochat's calculator, or Python in "
                             "the code sandbox")
    add_sandbox_flag(parser)


def chosen_tool(args):
    """The engine's tool that --tool names; a missing sandbox is refused now, before any model loads."""
    if args.tool == "python":
        return python_tool(args.sandbox)
    from jaxchat.engine import use_calculator  # lazily: the sandbox's own runs never import jax
    return use_calculator


def add_sandbox_flag(parser):
    """--unsafe-weak-sandbox: the explicit opt-out of the kernel boundary (sets args.sandbox)."""
    flag_adder(parser)("unsafe_weak_sandbox", dest="sandbox", action="store_const", const="weak", default="boundary",
                       help="run model-written code without the kernel boundary (Python-level guards only): that "
                            "code can then read and write your files and reach the network")


def _interpreter():
    """The base interpreter: a venv's own python needs the venv beside it, and the code gets no site-packages."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _bwrap_argv():
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if os.geteuid() == 0:  # no user namespace: the prelude drops to SANDBOX_UID with these two capabilities
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: /bin -> usr/bin
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    if not sys.base_prefix.startswith("/usr/"):  # Python installed elsewhere (pyenv, conda, a home directory)
        # Its parents are made traversable (bwrap would copy a home directory's 0700), nothing else in them.
        parents = list(reversed(pathlib.PurePath(sys.base_prefix).parents))[1:]
        argv += [arg for parent in parents for arg in ("--perms", "0755", "--dir", str(parent))]
        argv += ["--ro-bind", sys.base_prefix, sys.base_prefix]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev",
             "--size", str(MAX_FILE_BYTES), "--perms", "1777", "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return argv


@functools.cache
def boundary_problem():
    """Why the kernel boundary cannot be used here, or None when it can (tried once per process)."""
    if not sys.platform.startswith("linux"):
        return f"it needs Linux namespaces, and this is {sys.platform}"
    if seccomp.filter_program() is None:
        return f"its system-call filter knows {' and '.join(seccomp.ARCHES)} machines, and this is {platform.machine()}"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt install bubblewrap; Fedora: dnf install bubblewrap)"
    result = _run("print('ok')", "boundary", timeout=10.0, maximum_memory_bytes=None, max_output_bytes=4096)
    if result.stdout == "ok\n":
        return None
    why = result.error or "no output"
    return (f"bubblewrap could not start the sandbox ({why}): it needs unprivileged user namespaces, or root with "
            f"CAP_SYS_ADMIN (a container started without them cannot nest one)")


def require(sandbox):
    """Raise SandboxUnavailable unless code can run in `sandbox` here (call at start-up, before any work)."""
    if sandbox not in SANDBOXES:
        raise UserError(f"unknown sandbox {sandbox!r}; one of {', '.join(SANDBOXES)}")
    if sandbox == "boundary" and (why := boundary_problem()):
        raise SandboxUnavailable(f"cannot run model-written code behind the kernel boundary: {why}. "
                                 f"--unsafe-weak-sandbox runs it anyway, guarded only at the Python level")


def python_tool(sandbox="boundary", timeout=5.0):
    """The engine's python tool: runs a closed python block; its output (or the error) is what the model sees."""
    require(sandbox)

    def run(code):
        result = execute_code(code, timeout=timeout, sandbox=sandbox)
        return result.stdout.strip() if result.success else f"Error: {result.error}"
    return run


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
                 max_output_bytes: int = 64 * 1024, sandbox: str = "boundary") -> ExecutionResult:
    """Run `code` in a sandboxed child Python process and report what happened. A "boundary" sandbox that this
    system cannot provide raises SandboxUnavailable (nothing runs)."""
    require(sandbox)
    return _run(code, sandbox, timeout, maximum_memory_bytes, max_output_bytes)


def _run(code, sandbox, timeout, maximum_memory_bytes, max_output_bytes):
    with tempfile.TemporaryDirectory(prefix="jaxchat-exec-", ignore_cleanup_errors=True) as workdir:
        # The code travels as a file (read and deleted by the prelude), so any quotes, backslashes
        # or unicode survive untouched and there is no command-line length limit.
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        boundary = sandbox == "boundary"
        limits = [maximum_memory_bytes or 0, math.ceil(timeout) + 1, MAX_FILE_BYTES,
                  MAX_PROCESSES if boundary else 0, MAX_OPEN_FILES,
                  SANDBOX_UID if boundary and os.geteuid() == 0 else -1, 0 if boundary else 1]
        with open(path, "rb") as program, tempfile.TemporaryFile() as syscall_filter:
            if boundary:  # bwrap copies the program into the sandbox's own /tmp and installs the filter
                syscall_filter.write(seccomp.filter_program())
                syscall_filter.seek(0)
                prefix = [*_bwrap_argv(), "--seccomp", str(syscall_filter.fileno()),
                          "--file", str(program.fileno()), "/tmp/program.py", _interpreter()]
                path, cwd = "/tmp/program.py", None
            else:
                prefix, cwd = [_interpreter()], workdir
            argv = [*prefix, "-I", "-S", "-u", "-X", "utf8", "-c", _PRELUDE, path, *map(str, limits)]
            env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp" if boundary else workdir, "LANG": "C.UTF-8",
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            deadline = time.monotonic() + timeout
            with subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True,
                                  pass_fds=(program.fileno(), syscall_filter.fileno()) if boundary else ()) as proc:
                try:
                    out, err, timed_out, overflow = _collect(proc, deadline, max_output_bytes)
                    if not (timed_out or overflow):
                        try:  # both pipes closed, yet the child may still be running
                            proc.wait(max(0.0, deadline - time.monotonic()))
                        except subprocess.TimeoutExpired:
                            timed_out = True
                finally:
                    if proc.returncode is None:  # kill only while unreaped, so the pid cannot be reused
                        # The group is the child's (start_new_session); bwrap's sandbox dies with it
                        # (--die-with-parent takes down the PID namespace and everything in it).
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
    return _result(proc.returncode, out, err, timed_out, overflow, timeout, maximum_memory_bytes, max_output_bytes)


def _result(returncode, out, err, timed_out, overflow, timeout, maximum_memory_bytes, max_output_bytes):
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    timed_out = timed_out or returncode == -signal.SIGXCPU  # CPU rlimit as the backup
    success = returncode == 0 and not timed_out and not overflow
    memory_exceeded = not success and "MemoryError" in stderr
    error = None
    if timed_out:
        error = f"timed out after {timeout} s"
    elif memory_exceeded:
        error = f"MemoryError: memory limit exceeded ({maximum_memory_bytes} bytes)"
    elif overflow:
        error = f"output exceeded {max_output_bytes} bytes: truncated and the process was killed"
    elif returncode in (-signal.SIGSYS, 128 + signal.SIGSYS):  # bwrap passes its child's signal on as 128 + n
        error = "killed by the sandbox's system-call filter (a forbidden system call)"
    elif not success:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else f"exited with code {returncode}"
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded)
