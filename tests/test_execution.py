"""jaxchat.execution: what both sandboxes share (every case runs a real child process), and the weak sandbox's
Python-level guards. The kernel boundary's escapes are in test_sandbox.py."""

import os
import time

import pytest

from jaxchat.execution import ExecutionResult, execute_code


def test_print_hello(sandbox):
    result = execute_code("print('hello world')", sandbox=sandbox)
    assert isinstance(result, ExecutionResult)
    assert result.success and result.stdout == "hello world\n" and result.stderr == ""
    assert result.error is None and not result.timeout and not result.memory_exceeded


def test_normal_computation(sandbox):
    code = "def triangle(n):\n    return sum(range(n + 1))\n\nprint(triangle(100), [x * x for x in range(5)])\n"
    result = execute_code(code, sandbox=sandbox)
    assert result.success, result
    assert result.stdout == "5050 [0, 1, 4, 9, 16]\n"


def test_exception_reports_last_line(sandbox):
    result = execute_code("x = 1\nprint('before')\nx / 0\n", sandbox=sandbox)
    assert not result.success
    assert result.stdout == "before\n"
    assert result.error == "ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in result.stderr


def test_syntax_error(sandbox):
    result = execute_code("def f(:\n    pass\n", sandbox=sandbox)
    assert not result.success and "SyntaxError" in result.error


def test_infinite_loop_times_out(sandbox):
    start = time.monotonic()
    result = execute_code("while True:\n    pass\n", timeout=1, sandbox=sandbox)
    elapsed = time.monotonic() - start
    assert result.timeout and not result.success
    assert "timed out" in result.error
    assert elapsed < 4, elapsed


def test_output_before_timeout_is_kept(sandbox):
    result = execute_code("print('started')\nimport time\ntime.sleep(30)\n", timeout=1, sandbox=sandbox)
    assert result.timeout and result.stdout == "started\n"


def test_memory_limit(sandbox):
    result = execute_code("x = bytearray(1024 ** 3)\nprint('allocated')\n", sandbox=sandbox)
    assert result.memory_exceeded and not result.success
    assert result.stdout == "" and "memory" in result.error.lower()
    small = execute_code("x = bytearray(16 * 1024 ** 2)\nprint(len(x))\n", sandbox=sandbox)
    assert small.success and small.stdout == f"{16 * 1024 ** 2}\n"


@pytest.mark.parametrize("code", [
    "import os\nos.system('echo hi')",
    "import subprocess\nsubprocess.Popen(['echo', 'hi'])",
    "import subprocess\nsubprocess.run(['echo', 'hi'])",
    "import subprocess\nsubprocess.check_output('echo hi', shell=True)",
    "import os\nos.kill(1, 9)",
    "import os\npid = os.fork()\nprint('forked', pid)",
    "import os\nos.execv('/bin/echo', ['echo', 'hi'])",
    "import os\nos.chdir('/')",
    "import multiprocessing\np = multiprocessing.Process(target=print, args=('hi',))\np.start()\np.join()",
])
def test_processes_are_blocked(code):
    result = execute_code(code, sandbox="weak")
    assert not result.success
    assert "hi" not in result.stdout and "forked" not in result.stdout
    assert "PermissionError" in result.error and "disabled in the sandbox" in result.error


def test_rmtree_and_remove_are_blocked(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for code in (f"import shutil\nshutil.rmtree({str(victim)!r})",
                 f"import os\nos.remove({str(victim / 'keep.txt')!r})",
                 f"import os\nos.rename({str(victim)!r}, {str(tmp_path / 'moved')!r})"):
        result = execute_code(code, sandbox="weak")
        assert not result.success and "PermissionError" in result.error
    assert (victim / "keep.txt").read_text() == "precious"


def test_blocked_modules_and_builtins():
    for code in ("import resource", "import psutil", "exit(0)", "quit()"):
        result = execute_code(code, sandbox="weak")
        assert not result.success, code


def test_input_fails(sandbox):
    result = execute_code("x = input('name? ')\nprint('got', x)", sandbox=sandbox)
    assert not result.success
    assert "EOFError" in result.error and "got" not in result.stdout


def test_file_writes_land_in_a_temporary_directory(sandbox, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = ("import os\nprint(os.listdir('.'))\nopen('out.txt', 'w').write('x')\n"
            "print(open('out.txt').read(), os.listdir('.'))\nprint(os.getcwd())")
    result = execute_code(code, sandbox=sandbox)
    assert result.success, result
    lines = result.stdout.splitlines()
    assert lines[:2] == ["[]", "x ['out.txt']"]  # starts empty: the program file is gone
    sandbox_dir = lines[2]
    assert sandbox_dir != str(tmp_path)
    assert not (tmp_path / "out.txt").exists()
    assert list(tmp_path.iterdir()) == []
    if sandbox == "weak":
        assert not os.path.exists(sandbox_dir)  # deleted afterwards
    else:  # the boundary's /tmp is its own, in memory, gone with it
        assert sandbox_dir == "/tmp" and not os.path.exists("/tmp/out.txt")


def test_environment_is_scrubbed(sandbox, monkeypatch):
    monkeypatch.setenv("FAKE_SECRET_KEY", "s3cret")
    code = "import os\nprint(os.environ.get('FAKE_SECRET_KEY'))\nprint(sorted(os.environ))"
    result = execute_code(code, sandbox=sandbox)
    assert result.success, result
    assert result.stdout.splitlines()[0] == "None"
    assert "s3cret" not in result.stdout and "JAXCHAT_BASE_DIR" not in result.stdout


def test_quoting_survives(sandbox):
    code = "\n".join([
        r'''print("it's \"quoted\"")''',
        r'''print('back\\slash', r'raw\n')''',
        r'''print(f"{1 + 1} {{braces}} %s %%")''',
        '''print("""tri\'\'\'ple""", \'\'\'an"""other\'\'\')''',
        'print("héllo wörld ✓ 日本語 🚀")',
        'print(repr("\\x00\\t"))',
    ])
    result = execute_code(code, sandbox=sandbox)
    assert result.success, result
    assert result.stdout == ("it's \"quoted\"\n"
                             "back\\slash raw\\n\n"
                             "2 {braces} %s %%\n"
                             "tri'''ple an\"\"\"other\n"
                             "héllo wörld ✓ 日本語 🚀\n"
                             "'\\x00\\t'\n")


def test_guard_names_are_not_visible(sandbox):
    code = ("print(__name__)\nprint(sorted(k for k in dir() if not k.startswith('__')))\n"
            "import __main__\nprint(sorted(k for k in vars(__main__) if not k.startswith('__')))")
    result = execute_code(code, sandbox=sandbox)
    assert result.success, result
    assert result.stdout == "__main__\n[]\n[]\n"


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)",
])
def test_network_is_blocked(code):
    result = execute_code(code, sandbox="weak")
    assert not result.success
    assert "disabled in the sandbox" in result.error


def test_output_flood_is_cut(sandbox):
    start = time.monotonic()
    result = execute_code("while True:\n    print('x' * 1000)\n", timeout=5, max_output_bytes=10000, sandbox=sandbox)
    assert time.monotonic() - start < 3
    assert not result.success and not result.timeout
    assert 9000 <= len(result.stdout) <= 10000
    assert "truncated" in result.error


def test_large_legal_output_is_complete(sandbox):
    result = execute_code("for i in range(5000):\n    print(f'{i:09d}')\n", sandbox=sandbox)  # 50,000 bytes < 64 KiB
    assert result.success, result.error
    assert result.stdout == "".join(f"{i:09d}\n" for i in range(5000))
