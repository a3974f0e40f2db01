"""cwm_jax.rl.sandbox: limits, isolation and containment of hostile programs, for each usable backend.

The hostile scenarios (infinite loop, memory bomb, fork bomb, writes outside the working directory, reading the
parent's secrets, connecting to the host, ignoring SIGTERM, setsid daemons, output floods) run as whoever runs the
tests; as root, `test_unprivileged_user` also runs the key ones with the sandbox launched by uid 65534. Every test
leaves no process, cgroup or working directory behind (checked by the autouse fixture and the /proc scans).
"""

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from cwm_jax.rl import sandbox
from cwm_jax.rl.sandbox import Job, Limits, Pool, SandboxError, run, run_python

BACKENDS = sandbox.backends()
ROOT = os.geteuid() == 0
LIMITS = Limits(wall_s=2.0, cpu_s=2.0, memory_mb=192, max_procs=32, max_output_bytes=64 << 10)
MARGIN = 6.0  # seconds a run may take beyond its wall limit (start-up and cleanup on a loaded 2-core machine)
REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not BACKENDS, reason="no sandbox backend works here: " + "; ".join(sandbox._probe(b)[1] for b in sandbox.BACKENDS)
)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def no_leftovers():
    """Each test leaves no cgroup of this process behind."""
    yield
    prefix = f"cwm-sandbox-{os.getpid()}-"
    left = []
    for base in sandbox._cgroup_bases().values():
        try:
            left += [os.path.join(base, name) for name in os.listdir(base) if name.startswith(prefix)]
        except OSError:
            pass
    assert not left, f"cgroups left behind: {left}"


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def py(code: str, backend: str, limits: Limits = LIMITS, **kwargs) -> sandbox.Result:
    return run_python(textwrap.dedent(code), limits=limits, backend=backend, **kwargs)


# --- arguments -----------------------------------------------------------------------------------------------------


def test_limits_are_validated():
    with pytest.raises(SandboxError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(SandboxError, match="memory_mb"):
        Limits(memory_mb=1.5)
    with pytest.raises(SandboxError, match="max_procs"):
        Limits(max_procs=-1)
    with pytest.raises(SandboxError, match="cpu_s"):
        Limits(cpu_s=float("inf"))


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "", ".", "a/.."])
def test_bad_paths_are_refused(bad):
    with pytest.raises(SandboxError, match="files"):
        run(["/bin/true"], files={bad: "x"})
    with pytest.raises(SandboxError, match="collect"):
        run(["/bin/true"], collect=[bad])


def test_bad_arguments_are_refused():
    with pytest.raises(SandboxError, match="argv"):
        run([])
    with pytest.raises(SandboxError, match="backend"):
        run(["/bin/true"], backend="docker")
    with pytest.raises(SandboxError, match="main.py"):
        run_python("pass", files={"main.py": "x"})
    with pytest.raises(SandboxError, match="env"):
        run(["/bin/true"], env={"A=B": "c"})
    with pytest.raises(SandboxError, match="workers"):
        Pool(0)


@pytest.mark.skipif(not ROOT, reason="only root needs a cgroup to contain a fork bomb")
def test_root_without_cgroups_refuses(monkeypatch):
    monkeypatch.setattr(sandbox._Cgroup, "create", classmethod(lambda cls, limits, helpers: None))
    with pytest.raises(SandboxError, match="fork bomb"):
        run(["/bin/true"])


def test_module_needs_only_the_standard_library():
    """The module file alone imports and finds its backends under a bare interpreter (no JAX, no site packages)."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('sb', {str(REPO / 'cwm_jax/rl/sandbox.py')!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['sb'] = m; spec.loader.exec_module(m); "
        "print(m.backends(), sorted(n for n in sys.modules if n.split('.')[0] in ('jax', 'numpy', 'cwm_jax')))"
    )
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{BACKENDS} []"


def test_status_lines_end_with_the_inits_last_word():
    """Under bwrap the program could write to the status pipe: only the init's final line decides how it ended."""
    parse = sandbox._parse_status
    assert parse(b"ready\nexit 0 0.0\nsignal 9 1.5\n") == {"ready": True, "signal": 9, "cpu": 1.5}
    assert parse(b"ready\nexec_error forged\nexit 0 0.1\n") == {"ready": True, "exit": 0, "cpu": 0.1}
    assert parse(b"ready\nerror forged\nexit 1 0.1\n") == {"ready": True, "exit": 1, "cpu": 0.1}
    assert parse(b"error mounting /tmp failed\n") == {"error": "mounting /tmp failed"}


# --- plain runs ----------------------------------------------------------------------------------------------------


def test_exit_code_and_output(backend):
    result = py("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)", backend)
    assert (result.status, result.exit_code, result.signal) == ("error", 3, None)
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert not result.stdout_truncated and not result.stderr_truncated
    assert result.reason == "exited with status 3" and not result.ok
    result = run(["/bin/echo", "hello", "world"], limits=LIMITS, backend=backend)
    assert result.ok and result.stdout == b"hello world\n" and result.exit_code == 0
    result = run(["no-such-program"], limits=LIMITS, backend=backend)
    assert (result.status, result.exit_code) == ("error", 127) and "no-such-program" in result.reason


def test_stdin_is_delivered(backend):
    data = b"0123456789" * 50_000  # bigger than a pipe buffer: fed while the output is read
    code = "import sys, hashlib; d = sys.stdin.buffer.read(); print(len(d), hashlib.sha256(d).hexdigest())"
    result = py(code, backend, stdin=data)
    assert result.ok, result
    assert result.stdout.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
    assert py("print(input()[::-1])", backend, stdin="abc").stdout == b"cba\n"


def test_files_and_collect(backend):
    limits = Limits(wall_s=3, memory_mb=192, max_procs=32, max_collect_bytes=1000)
    code = """
        import os
        text = open("data/in.txt").read()
        open("out.txt", "w").write(text.upper())
        open("big.bin", "wb").write(b"x" * 5000)
        os.symlink("/etc/passwd", "link")
        os.mkfifo("fifo")
        os.mkdir("sub")
        os.symlink("/etc", "via")
    """
    collect = ["out.txt", "big.bin", "link", "fifo", "missing.txt", "data/in.txt", "via/passwd", "sub"]
    result = py(code, backend, limits=limits, files={"data/in.txt": "abc", "extra.bin": b"\x00\x01"}, collect=collect)
    assert result.ok, result
    assert result.files == {"out.txt": b"ABC", "big.bin": b"x" * 1000, "data/in.txt": b"abc"}


def test_working_directory_is_private_and_removed(backend):
    code = """
        import os
        print(os.getcwd(), os.environ["HOME"], oct(os.stat(".").st_mode & 0o777), sorted(os.listdir(".")))
    """
    result = py(code, backend, files={"a.txt": "1"})
    assert result.ok, result
    cwd, home, mode, listing = result.stdout.decode().split(" ", 3)
    assert cwd == home and os.path.basename(cwd).startswith("cwm-sandbox-") and mode == "0o700"
    assert listing.strip() == "['a.txt', 'main.py']"
    assert not os.path.exists(cwd)


def test_namespaces(backend):
    code = """
        import os, socket
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        print(socket.gethostname(), max(pids), status["CapEff"].strip(), status["NoNewPrivs"].strip(),
              [name for _, name in socket.if_nameindex()])
    """
    result = py(code, backend)
    assert result.ok, result
    hostname, max_pid, cap_eff, no_new_privs, interfaces = result.stdout.decode().split(" ", 4)
    assert hostname == "sandbox" and int(max_pid) < 10  # a fresh pid namespace: only the sandbox's processes
    assert int(cap_eff, 16) == 0 and no_new_privs == "1"
    assert interfaces.strip() == "['lo']"


# --- hostile programs ----------------------------------------------------------------------------------------------


def test_infinite_loop_times_out(backend):
    result = py("while True: pass", backend)
    assert result.status == "timeout" and result.signal == signal.SIGKILL, result
    assert "wall time limit" in result.reason
    assert LIMITS.wall_s <= result.wall_s < LIMITS.wall_s + MARGIN


def test_sigterm_ignored_is_killed_anyway(backend):
    code = """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.fork()  # and a child that ignores it too
        while True:
            time.sleep(0.01)
    """
    marker = f"cwm-test-{uuid.uuid4().hex}"
    start = time.monotonic()
    result = py(code, backend, args=[marker])
    assert result.status == "timeout", result
    assert time.monotonic() - start < LIMITS.wall_s + MARGIN
    assert processes_with(marker) == []


def test_cpu_limit(backend):
    result = py("while True: pass", backend, limits=Limits(wall_s=8, cpu_s=1, memory_mb=192, max_procs=32))
    assert result.status == "cpu_limit", result
    assert result.wall_s < 8


def test_memory_bomb(backend):
    code = """
        chunks = []
        while True:
            chunks.append(b"x" * (16 << 20))
    """
    result = py(code, backend)
    assert result.status == "memory_limit", result
    assert result.wall_s < LIMITS.wall_s + MARGIN


def test_fork_bomb_is_contained(backend):
    code = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    marker = f"cwm-test-{uuid.uuid4().hex}"
    start = time.monotonic()
    result = py(code, backend, args=[marker])
    assert result.status != "ok" and result.status != "sandbox_error", result
    assert time.monotonic() - start < LIMITS.wall_s + MARGIN
    assert processes_with(marker) == []


def test_writes_outside_the_working_directory_fail(backend, tmp_path):
    host_dir = tempfile.mkdtemp(prefix="cwm-sandbox-test-", dir="/var/tmp")  # on the root file system, not /tmp
    os.chmod(host_dir, 0o777)
    name = f"escape-{uuid.uuid4().hex}"
    targets = [
        f"/tmp/..{tmp_path}/{name}",  # the test's own tmp dir through /tmp/..
        f"{host_dir}/{name}",
        f"/var/tmp/{name}",
        f"/{name}",
        f"../{name}",  # next to the working directory, in the host's /tmp
        f"/dev/shm/{name}",
    ]
    code = """
        import os, sys
        for path in sys.argv[1:]:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:
                    f.write("escaped")
                print("wrote", path)
            except OSError as exc:
                print("failed", path, exc.errno)
    """
    try:
        result = py(code, backend, args=targets)
        assert result.ok, result
        lines = result.stdout.decode().splitlines()
        assert len(lines) == len(targets)
        for line in lines:
            assert line.startswith("failed") or line.split()[1].startswith(("/tmp/", "../", "/dev/shm/")), line
        on_host = [tmp_path / name, pathlib.Path(host_dir, name), pathlib.Path("/var/tmp", name)]
        on_host += [pathlib.Path("/", name), pathlib.Path(tempfile.gettempdir(), name), pathlib.Path("/dev/shm", name)]
        assert [path for path in on_host if path.exists()] == []
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def test_parent_environment_is_not_visible(backend, monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CWM_TEST_SECRET", secret)
    code = """
        import os, sys
        secret, parent = sys.argv[1], sys.argv[2]
        seen = [key for key, value in os.environ.items() if secret in value or key == "CWM_TEST_SECRET"]
        for path in ["/proc/1/environ", f"/proc/{parent}/environ"] + [
            f"/proc/{p}/environ" for p in os.listdir("/proc") if p.isdigit()
        ]:
            try:
                if secret.encode() in open(path, "rb").read():
                    seen.append(path)
            except OSError:
                pass
        print(sorted(os.environ), seen)
    """
    result = py(code, backend, args=[secret, str(os.getpid())])
    assert result.ok, result
    expected = ["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED"]
    assert result.stdout.decode().strip() == f"{expected} []"
    result = run(["/usr/bin/env"], env={"EXTRA": "1"}, limits=LIMITS, backend=backend)
    assert b"EXTRA=1\n" in result.stdout and secret.encode() not in result.stdout


def test_no_connection_to_the_host(backend):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        code = """
            import socket, sys
            try:
                socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
                print("connected")
            except OSError as exc:
                print("refused", exc.errno)
        """
        result = py(code, backend, args=[str(port)])
        assert result.ok, result
        assert result.stdout.startswith(b"refused"), result.stdout
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_setsid_daemon_dies_with_the_run(backend):
    marker = f"cwm-test-{uuid.uuid4().hex}"
    code = """
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                fd = os.open("/dev/null", os.O_RDWR)
                for target in (0, 1, 2):
                    os.dup2(fd, target)
                daemon = "import time; time.sleep(1); open('late.txt', 'w').write('x'); time.sleep(30)"
                os.execv(sys.executable, [sys.executable, "-c", daemon, sys.argv[1]])
            os._exit(0)
        print("parent done")
    """
    start = time.monotonic()
    result = py(code, backend, args=[marker], collect=["late.txt"])
    assert result.ok and result.stdout == b"parent done\n", result
    assert time.monotonic() - start < LIMITS.wall_s  # the run did not wait for the daemon
    assert processes_with(marker) == []
    time.sleep(1.2)  # when the daemon would have written
    assert processes_with(marker) == [] and result.files == {}


def test_output_flood(backend):
    code = """
        import sys
        while True:
            sys.stdout.write("x" * 65536)
    """
    start = time.monotonic()
    result = py(code, backend)
    assert result.status == "output_limit", result
    assert len(result.stdout) == LIMITS.max_output_bytes and result.stdout_truncated
    assert time.monotonic() - start < LIMITS.wall_s  # killed as soon as it passed 4x the cap


def test_stderr_flood_is_capped_not_killed(backend):
    code = "import sys; sys.stderr.write('e' * 100_000); print('done')"
    result = py(code, backend)
    assert result.ok and result.stdout == b"done\n", result
    assert len(result.stderr) == LIMITS.max_output_bytes and result.stderr_truncated


# --- pool ----------------------------------------------------------------------------------------------------------


def test_pool_keeps_order_and_runs_concurrently():
    code = (
        "import sys, time; start = time.time(); time.sleep(float(sys.argv[1])); print(sys.argv[2], start, time.time())"
    )
    python = sandbox.python_executable()
    delays = [0.8, 0.1, 0.5, 0.0]
    jobs = [Job(argv=(python, "-I", "-c", code, str(d), str(i))) for i, d in enumerate(delays)]
    with Pool(2, limits=LIMITS) as pool:
        results = list(pool.map(jobs))
        unordered = dict(pool.imap_unordered(jobs))
    assert all(result.ok for result in results), results
    spans = [result.stdout.decode().split() for result in results]
    assert [int(span[0]) for span in spans] == [0, 1, 2, 3]
    (_, start0, end0), (_, start1, end1) = spans[0], spans[1]
    assert float(start1) < float(end0) and float(start0) < float(end1)  # jobs 0 and 1 overlapped
    assert sorted(unordered) == [0, 1, 2, 3]
    assert [unordered[i].stdout.split()[0] for i in range(4)] == [b"0", b"1", b"2", b"3"]


def test_pool_job_with_files_and_stdin():
    python = sandbox.python_executable()
    job = Job(argv=[python, "-I", "prog.py"], stdin="in", files={"prog.py": "print(input() + 'put')"})
    with Pool(1, limits=LIMITS) as pool:
        (result,) = pool.map([job])
    assert result.ok and result.stdout == b"input\n", result


# --- unprivileged ----------------------------------------------------------------------------------------------------

DRIVER = """
import json, os, socket, sys, time
import sandbox

marker = sys.argv[1]


def cmdline(pid):
    try:
        with open("/proc/" + pid + "/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


os.environ["CWM_TEST_SECRET"] = secret = "s3cret-" + marker
listener = socket.create_server(("127.0.0.1", 0))
limits = sandbox.Limits(wall_s=2, cpu_s=2, memory_mb=192, max_procs=32, max_output_bytes=65536)
python = sandbox.python_executable()
programs = {
    "fork_bomb": "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass",
    "memory_bomb": "chunks = []\\nwhile True:\\n    chunks.append(b'x' * (16 << 20))",
    "loop": "while True: pass",
    "network": "import socket, sys\\nsocket.create_connection(('127.0.0.1', int(sys.argv[2])), timeout=1)",
    "secret": (
        "import os, sys\\nfound = []\\nfor p in ['/proc/1/environ', '/proc/%s/environ' % sys.argv[3]]:\\n"
        "    try:\\n        found += [p] if sys.argv[4].encode() in open(p, 'rb').read() else []\\n"
        "    except OSError:\\n        pass\\nprint(sorted(os.environ), found)"
    ),
    "daemon": (
        "import os, sys\\nif os.fork() == 0:\\n    os.setsid()\\n    if os.fork() == 0:\\n"
        "        fd = os.open('/dev/null', os.O_RDWR)\\n        [os.dup2(fd, i) for i in (0, 1, 2)]\\n"
        "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', sys.argv[1]])\\n"
        "    os._exit(0)"
    ),
    "write": "import sys\\nopen('/var/tmp/' + sys.argv[1], 'w')",
}
args = (marker, str(listener.getsockname()[1]), str(os.getpid()), secret)
jobs = [sandbox.Job(argv=(python, "-I", "main.py", *args), files={"main.py": code}) for code in programs.values()]
report = {"uid": os.getuid(), "python": python}
for backend in sandbox.backends():
    start = time.monotonic()
    with sandbox.Pool(len(jobs), limits=limits, backend=backend) as pool:
        results = dict(zip(programs, pool.map(jobs)))
    left = [p for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid()) and marker.encode() in cmdline(p)]
    report[backend] = {
        "seconds": time.monotonic() - start,
        "statuses": {name: result.status for name, result in results.items()},
        "stdout": {name: result.stdout.decode(errors="replace") for name, result in results.items()},
        "stderr": {name: result.stderr.decode(errors="replace")[-300:] for name, result in results.items()},
        "left": left,
    }
print(json.dumps(report))
"""


@pytest.mark.skipif(not ROOT, reason="as a non-root user the other tests already cover the unprivileged path")
@pytest.mark.skipif(not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"), reason="needs setpriv")
def test_unprivileged_user():
    """The key scenarios with the sandbox itself launched by uid 65534 (rlimits instead of cgroups)."""
    folder = tempfile.mkdtemp(prefix="cwm-sandbox-test-")
    marker = f"cwm-test-{uuid.uuid4().hex}"
    try:
        shutil.copy(REPO / "cwm_jax" / "rl" / "sandbox.py", folder)
        pathlib.Path(folder, "driver.py").write_text(DRIVER)
        os.chmod(folder, 0o755)
        for name in ("sandbox.py", "driver.py"):
            os.chmod(os.path.join(folder, name), 0o644)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "driver.py", marker]
        proc = subprocess.run(
            cmd, cwd=folder, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "LANG": "C"}
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["uid"] == 65534 and report["python"] == "/usr/bin/python3"
        expected_env = "['HOME', 'LANG', 'PATH', 'PYTHONDONTWRITEBYTECODE', 'PYTHONHASHSEED'] []\n"
        for backend in BACKENDS:
            got = report[backend]
            statuses = got["statuses"]
            assert statuses["fork_bomb"] not in ("ok", "sandbox_error"), got
            assert statuses["memory_bomb"] == "memory_limit", got
            assert statuses["loop"] == "timeout", got
            assert statuses["network"] == "error" and "Error" in got["stderr"]["network"], got
            assert statuses["secret"] == "ok" and got["stdout"]["secret"] == expected_env, got
            assert statuses["daemon"] == "ok", got
            assert statuses["write"] == "error" and "Read-only file system" in got["stderr"]["write"], got
            assert got["left"] == [] and got["seconds"] < LIMITS.wall_s + MARGIN, got
        assert processes_with(marker) == []
        assert not os.path.exists(f"/var/tmp/{marker}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- benchmark -----------------------------------------------------------------------------------------------------


def test_benchmark_smoke(tmp_path, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO / "benchmarks"))
        spec = importlib.util.spec_from_file_location("sandbox_benchmark", REPO / "benchmarks" / "sandbox.py")
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        path = tmp_path / "sandbox.json"
        assert module.main(["--smoke", "--workers", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sandboxed / unsandboxed programs per second")
    assert out.rstrip().splitlines()[-1].startswith("| ")
    result = json.loads(path.read_text())
    assert result["programs"] == 10 and {row["backend"] for row in result["rows"]} == {"none", *BACKENDS}
    assert all(row["programs_per_s"] > 0 for row in result["rows"])
