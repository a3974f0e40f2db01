"""Run untrusted programs isolated: Linux namespaces, resource limits, a private working directory, no network.

    result = run_python("print(input())", stdin="hi", limits=Limits(wall_s=2, memory_mb=256))
    result.status, result.stdout  # ("ok", b"hi\\n")
    with Pool(workers=8) as pool:
        for result in pool.map(Job(argv=("/bin/echo", str(i))) for i in range(100)): ...

Standard library only (importable without JAX); Linux only. The release runs its executions under bubblewrap; this
module drives `bwrap` (Debian's `bubblewrap` package) when it is installed and works, else `unshare` from util-linux.

How a run is isolated (the decisions, in order of what happens):

- Working directory: a fresh `tempfile.mkdtemp(prefix="cwm-sandbox-")` (mode 0700) holding the `files` given; it is
  the program's cwd and HOME, the only writable place on the host file system, and it is removed after the run
  whatever happens (`collect` reads files out of it first, never following symlinks).
- Environment: only PATH=/usr/local/bin:/usr/bin:/bin, HOME, LANG=C.UTF-8, PYTHONDONTWRITEBYTECODE=1,
  PYTHONHASHSEED=0 and the caller's `env`; the parent's environment never reaches the sandbox (not even the
  sandboxing tools see it).
- Namespaces: new user, pid, mount, network, ipc and uts (hostname "sandbox") namespaces. Outside its user
  namespace the program is always the caller's uid (inside: 0 with unshare, the caller's uid with bwrap), so as root
  it runs as uid 0 without capabilities. The network namespace has only its own loopback: nothing on the host,
  127.0.0.1 included, can be reached.
- File system: everything mounted is read-only; /tmp and /dev/shm are fresh tmpfs (size = memory limit), /dev is a
  read-only tmpfs with only null, zero, full, random, urandom and tty (bwrap adds pts), /run an empty read-only
  tmpfs (hides the host's sockets), /proc a read-only procfs of the sandbox's own processes (read-only because
  the host's /proc/sys trusts uid 0), and the working directory is bound read-write at its own path. bwrap builds
  this itself (`--ro-bind / / --proc --remount-ro /proc --dev --tmpfs`); with unshare, a small Python init run
  inside the namespaces (`_INIT`) mounts the tmpfs and remounts every other mount read-only through libc
  `mount(2)` via ctypes.
- Capabilities: the program runs with none (bwrap `--cap-drop ALL`; the unshare init empties the bounding, ambient
  and inheritable sets before exec) and with no_new_privs, so it cannot unmount the covers above, remount anything
  writable or regain privileges through set-uid binaries.
- Processes: the init (pid 1 with unshare, pid 2 under bwrap's own pid 1) forks the program in a new session,
  waits for it, then SIGKILLs every other process of the namespace and reports the status over a pipe: daemons
  (double fork + setsid) die with the run. Killing the direct child (unshare `--kill-child`, bwrap
  `--die-with-parent`) takes the whole pid namespace down; the init also exits when this process dies (a lifeline
  pipe reaches EOF).
- Limits: RLIMIT_CPU = ceil(cpu_s) (hard one second more: SIGXCPU, then SIGKILL), RLIMIT_FSIZE, RLIMIT_CORE = 0,
  RLIMIT_NOFILE = 256 and RLIMIT_NPROC = max_procs + 2 (the sandbox's two helper processes), set in the program's
  process only. RLIMIT_NPROC counts per uid per user namespace (kernel >= 5.14), so parallel sandboxes do not share
  it; it binds only a non-root caller though (the kernel exempts uid 0 even inside a user namespace). So when this
  process can write cgroups (root), each run gets its own cgroup: pids.max = max_procs + helpers and a memory limit
  (v1 `memory.limit_in_bytes` and `memsw`, or v2 `memory.max` with no swap), joined before the namespace tool
  starts (a `/bin/sh` stage waits on a pipe until the parent has written its pid to `cgroup.procs`, so no fork can
  escape); afterwards every process left in it is killed and the cgroup removed. As root without a writable pids
  cgroup, `run` raises SandboxError: nothing else could contain a fork bomb. Without a memory cgroup the memory
  limit is RLIMIT_AS per process.
- Wall clock and output: stdout and stderr are read concurrently (one selector loop, which also feeds stdin) into
  buffers capped at max_output_bytes each; the rest is read and discarded so the program never blocks, and once a
  stream passes 4x the cap the sandbox is killed ("output_limit"). At wall_s the namespace's init, the sandbox's
  process group and cgroup are SIGKILLed ("timeout"; a program that ignores SIGTERM is stopped all the same), and
  `run` returns only once the kernel has removed every process of the namespace (a pidfd on its init).
- Interpreter: `python_executable()` is `sys.executable` (the sandbox user is the caller's uid, so it can run what
  the caller runs, e.g. a venv under /root when root) unless it lies under a path the sandbox covers (/tmp, /dev,
  /run, /proc), then /usr/bin/python3 or `python3` on PATH.

Known limits: the working directory lives on the host's disk and only each file's size is capped (RLIMIT_FSIZE);
Unix sockets outside /run and /tmp stay reachable when their permissions allow the caller's uid; seccomp is not used.
Joining a cgroup v1 costs 5-15 ms of latency per run (the kernel waits for an RCU grace period), not CPU.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import functools
import itertools
import marshal
import math
import os
import secrets
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence

__all__ = [
    "Job",
    "Limits",
    "Pool",
    "Result",
    "SandboxError",
    "backends",
    "python_executable",
    "run",
    "run_python",
]

BACKENDS = ("bwrap", "unshare")  # preference order
STATUSES = ("ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "signal", "sandbox_error")
PATH = "/usr/local/bin:/usr/bin:/bin"
HOSTNAME = "sandbox"
COVERED = ("/tmp", "/dev", "/run", "/proc")  # host paths the sandbox hides behind its own mounts
OUTPUT_KILL_FACTOR = 4  # kill the sandbox once a stream has written this many times max_output_bytes
HELPERS = {"unshare": 2, "bwrap": 3}  # sandbox processes besides the program's: unshare/bwrap and the inits
_CGROUP_PREFIX = "cwm-sandbox-"


class SandboxError(RuntimeError):
    """Isolation is impossible here (no namespaces, no backend, no cgroup as root) or the arguments are bad."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run; every field must be positive."""

    wall_s: float = 10.0  # wall clock, then everything in the sandbox is killed
    cpu_s: float = 10.0  # RLIMIT_CPU (rounded up to whole seconds)
    memory_mb: int = 512  # cgroup memory limit when writable, else RLIMIT_AS per process
    max_procs: int = 64  # processes and threads: cgroup pids.max when writable, and RLIMIT_NPROC
    max_output_bytes: int = 1 << 20  # per stream; the rest is read and discarded (killed once over 4x this)
    max_file_mb: int = 64  # RLIMIT_FSIZE
    max_collect_bytes: int = 16 << 20  # per collected file (see `collect`)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            integral = field.type in ("int", int)
            kind = int if integral else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
                wanted = "a positive integer" if integral else "a positive number"
                raise SandboxError(f"Limits.{field.name} must be {wanted}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Result:
    """How one sandboxed run ended: its status, exit code or signal, output (capped) and collected files.

    status: "ok" (exit 0), "error" (nonzero exit, or 127 when argv[0] cannot be executed), "timeout" (wall clock),
    "cpu_limit" (SIGXCPU, or SIGKILL after the CPU limit), "memory_limit" (the cgroup's OOM killer struck, or a
    failed run whose stderr ends with MemoryError / "Cannot allocate memory"), "output_limit" (over 4x the cap on a
    stream), "signal" (killed by another signal) or "sandbox_error" (the sandbox itself failed; see reason).
    """

    status: str  # one of STATUSES
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    wall_s: float
    reason: str  # one line: why it stopped
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the program exited with status 0."""
        return self.status == "ok"


_NO_FILES: Mapping[str, bytes | str] = types.MappingProxyType({})
_DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class Job:
    """The arguments of one `run` call, for `Pool`."""

    argv: tuple[str, ...]
    stdin: bytes | str = b""
    files: Mapping[str, bytes | str] = dataclasses.field(default_factory=dict)
    collect: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "collect", tuple(self.collect))


# The sandbox's init, run as `python -I -S -c _INIT CONFIG` (marshal, hex) inside the namespaces. With unshare it
# first builds the file system view (bwrap does that itself), then forks the program with its limits and without
# capabilities, reaps until the program exits, kills whatever else is left in the namespace and reports over the
# status pipe.
_INIT = r"""
import marshal, os, select, signal, sys

cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
status_fd, life_fd = cfg["status_fd"], cfg["life_fd"]
os.set_inheritable(status_fd, False)
os.set_inheritable(life_fd, False)


def report(kind, *values):
    text = " ".join(map(str, (kind, *values))).replace("\n", " ")
    os.write(status_fd, os.fsencode(text + "\n"))


if cfg["mount"] or cfg["drop_caps"]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {src or fstype} on {dst}")


def unescape(field):
    out, i = bytearray(), 0
    raw = os.fsencode(field)
    while i < len(raw):
        if raw[i] == 92 and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEEP = {"nosuid": 2, "nodev": 4, "noexec": 8, "nosymfollow": 256, "noatime": 1024, "nodiratime": 2048,
        "relatime": 1 << 21, "strictatime": 1 << 24}


def setup_mounts():
    work, size = cfg["workdir"], cfg["tmpfs_size"]
    mount(None, "/", None, REC | PRIVATE)
    work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY)
    devices = {}
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        try:
            devices[name] = os.open("/dev/" + name, os.O_PATH)
        except OSError:
            pass
    writable = {work, "/tmp", "/dev/shm"} | {"/dev/" + name for name in devices}
    mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, f"mode=1777,size={size}")
    mount("tmpfs", "/dev", "tmpfs", NOSUID | NOEXEC, "mode=755,size=64k")
    for name, fd in devices.items():
        os.close(os.open("/dev/" + name, os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/proc/self/fd/{fd}", "/dev/" + name, None, BIND)
    for name, target in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink("/proc/self/fd" + target, "/dev/" + name)
    os.mkdir("/dev/shm")
    mount("tmpfs", "/dev/shm", "tmpfs", NOSUID | NODEV, f"mode=1777,size={size}")
    if os.path.isdir("/run"):
        mount("tmpfs", "/run", "tmpfs", NOSUID | NODEV | NOEXEC, "mode=755,size=64k")
    os.makedirs(work, exist_ok=True)
    mount(f"/proc/self/fd/{work_fd}", work, None, BIND | REC)
    top = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            top[unescape(fields[4])] = fields[5].split(",")  # the last entry at a path is the visible one
    for point, options in top.items():
        if point in writable or "ro" in options:
            continue
        flags = REMOUNT | BIND | RDONLY
        for option in options:
            flags |= KEEP.get(option, 0)
        try:
            mount(None, point, None, flags)
        except OSError as exc:
            # Covered by a mount above (gone, or no longer a mount point) or not reachable: the program cannot
            # reach it either.
            if exc.errno not in (2, 13, 22):
                raise
    check(libc.sethostname(cfg["hostname"].encode(), len(cfg["hostname"])), "sethostname")
    os.chdir(work)  # the cwd inherited from the parent is the directory under the bind mount


def drop_capabilities():
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        check(libc.prctl(24, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL; kernels without ambient capabilities have none to clear
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


def start_program():
    import resource

    os.setsid()
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["drop_caps"]:
        drop_capabilities()
    os.execvpe(cfg["argv"][0], cfg["argv"], cfg["env"])


try:
    if cfg["mount"]:
        setup_mounts()
except BaseException as exc:
    report("error", f"setting up the sandbox's file system failed: {exc}")
    os._exit(127)

wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
report("ready")
pid = os.fork()
if pid == 0:
    try:
        start_program()
    except BaseException as exc:
        try:
            report("exec_error", f"{type(exc).__name__}: {exc}")
        finally:
            os._exit(127)

done = None
while done is None:
    while True:
        try:
            child, wait_status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            child = 0
        if child == 0:
            break
        if child == pid:
            done = wait_status, usage
            break
    if done is None:
        readable, _, _ = select.select([wake_r, life_fd], [], [])
        if life_fd in readable and not os.read(life_fd, 64):
            os._exit(137)  # the parent is gone: take the sandbox down with us
        if wake_r in readable:
            os.read(wake_r, 4096)
for _ in range(2):
    try:
        os.kill(-1, signal.SIGKILL)  # daemons and stragglers: everything in the namespace but pid 1 and us
    except OSError:
        pass
wait_status, usage = done
cpu = usage.ru_utime + usage.ru_stime
if os.WIFSIGNALED(wait_status):
    report("signal", os.WTERMSIG(wait_status), cpu)
else:
    report("exit", os.WEXITSTATUS(wait_status), cpu)
os._exit(0)
"""


# --- backends ------------------------------------------------------------------------------------------------------


def _clean_env(workdir: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a sandboxed program."""
    env = {
        "PATH": PATH,
        "HOME": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key or "\0" in key + value:
            raise SandboxError(f"env must map names to strings (no '=' or NUL in names), got {key!r}: {value!r}")
        env[key] = value
    return env


@functools.cache
def _probe(backend: str) -> tuple[str | None, str]:
    """(the tool's path, "") when `backend` can create the namespaces here, else (None, why not)."""
    tool = shutil.which(backend)
    if tool is None:
        install = "bubblewrap" if backend == "bwrap" else "util-linux"
        return None, f"{backend} is not installed (apt-get install {install})"
    if backend == "bwrap":
        cmd = [tool, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
        cmd += ["--cap-drop", "ALL"] if os.geteuid() == 0 else []
    else:
        cmd = [tool, "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
        cmd += ["--net", "--ipc", "--uts"]
    try:
        proc = subprocess.run([*cmd, "/bin/true"], capture_output=True, env={"PATH": PATH}, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{backend} could not be run: {exc}"
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        return None, (
            f"{backend} cannot create namespaces here ({message[-1] if message else f'exit {proc.returncode}'}); "
            "allow unprivileged user namespaces (sysctl user.max_user_namespaces=10000, "
            "kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0)"
        )
    return tool, ""


@functools.cache
def _bwrap_options(tool: str) -> frozenset[str]:
    """The options this bwrap knows of those that appeared after 0.4 (--size, --perms)."""
    try:
        text = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(option for option in ("--size", "--perms") if option in text)


def backends() -> list[str]:
    """The backends that can isolate programs on this machine, in preference order (a subset of "bwrap", "unshare")."""
    return [backend for backend in BACKENDS if _probe(backend)[0] is not None]


def _choose_backend(backend: str | None) -> tuple[str, str]:
    """(backend, the tool's path) for `backend` (None: the preferred usable one); raises SandboxError if unusable."""
    if backend is not None and backend not in BACKENDS:
        raise SandboxError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    reasons = []
    for name in (backend,) if backend else BACKENDS:
        tool, why = _probe(name)
        if tool is not None:
            return name, tool
        reasons.append(why)
    raise SandboxError("no sandbox backend works here: " + "; ".join(reasons))


def _covered(path: str) -> bool:
    """Whether the sandbox hides `path` behind one of its own mounts."""
    return any(path == top or path.startswith(top + "/") for top in COVERED)


def python_executable() -> str:
    """Path of a Python interpreter the sandboxed program can execute; raises SandboxError if there is none.

    The sandbox user is the caller's uid, so `sys.executable` works (a venv under /root included when root) unless
    it lies under a path the sandbox covers; then /usr/bin/python3, or `python3` on PATH, readable by everyone.
    """
    if sys.executable and not _covered(os.path.abspath(sys.executable)):
        if not _covered(os.path.realpath(sys.executable)) and os.access(sys.executable, os.X_OK):
            return sys.executable
    for candidate in ("/usr/bin/python3", shutil.which("python3", path=PATH)):
        if candidate and not _covered(os.path.realpath(candidate)) and os.access(candidate, os.X_OK):
            if os.stat(candidate).st_mode & stat.S_IXOTH:
                return candidate
    raise SandboxError(
        f"no Python interpreter the sandbox can execute: {sys.executable!r} lies under one of {COVERED} and there is "
        "no /usr/bin/python3; install python3 (apt-get install python3)"
    )


# --- cgroups -------------------------------------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, file system type, super options) of this process's mounts."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].replace("\\040", " ")
            mounts.append((point, fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""))
    return mounts


@functools.cache
def _cgroup_bases() -> dict[str, str]:
    """The directory of this process's own cgroup per controller ("pids", "memory"; "unified" for cgroup v2)."""
    own = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for controller in controllers.split(",") if controllers else ["unified"]:
                    own[controller] = path.lstrip("/")
        mounts = _mountinfo()
    except OSError:
        return {}
    bases = {}
    for point, fstype, options in mounts:
        if fstype == "cgroup":
            names = [c for c in ("pids", "memory") if c in options.split(",")]
        elif fstype == "cgroup2":
            names = ["unified"]
        else:
            continue
        for name in names:
            path = os.path.join(point, own.get(name, ""))
            bases[name] = path if os.path.isdir(path) else point
    return bases


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cgroup_pids(directory: str) -> list[int]:
    return [int(pid) for pid in _read(os.path.join(directory, "cgroup.procs")).split()]


def _empty_and_remove(directory: str, timeout_s: float = 5.0) -> bool:
    """SIGKILL every process in the cgroup `directory` until none is left, then remove it; whether it is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = _cgroup_pids(directory)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not pids:
            try:
                os.rmdir(directory)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


_swept = False
_sweep_lock = threading.Lock()


def _sweep_stale(bases: Iterable[str]) -> None:
    """Remove the cgroups left by sandboxing processes that died (once per process)."""
    global _swept
    with _sweep_lock:
        if _swept:
            return
        _swept = True
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            if not name.startswith(_CGROUP_PREFIX):
                continue
            try:
                os.kill(int(name[len(_CGROUP_PREFIX) :].split("-")[0]), 0)
            except ProcessLookupError:
                _empty_and_remove(os.path.join(base, name), timeout_s=1.0)
            except (ValueError, OSError):
                pass


_counter = itertools.count()


class _Cgroup:
    """One run's cgroup(s): a process limit and, where the memory controller is writable, a memory limit."""

    def __init__(self, directories: list[str], memory: str | None, memory_v2: bool):
        self.directories = directories
        self.memory = memory
        self.memory_v2 = memory_v2

    @classmethod
    def create(cls, limits: Limits, helpers: int) -> _Cgroup | None:
        """The cgroups of a new run, or None when this process cannot create a pids cgroup."""
        bases = _cgroup_bases()
        _sweep_stale(bases.values())
        name = f"{_CGROUP_PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        pids_max = str(limits.max_procs + helpers)
        memory_bytes = str(limits.memory_mb << 20)
        made: list[str] = []

        def make(base: str) -> str | None:
            path = os.path.join(base, name)
            try:
                os.mkdir(path, 0o755)
            except OSError:
                return None
            made.append(path)
            return path

        try:
            pids = make(bases["pids"]) if "pids" in bases else None
            if pids is not None:
                _write(os.path.join(pids, "pids.max"), pids_max)
                memory = make(bases["memory"]) if "memory" in bases else None
                if memory is not None:
                    _write(os.path.join(memory, "memory.limit_in_bytes"), memory_bytes)
                    if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
                        _write(os.path.join(memory, "memory.memsw.limit_in_bytes"), memory_bytes)
                return cls(made, memory, memory_v2=False)
            unified = make(bases["unified"]) if "unified" in bases else None
            if unified is None or not os.path.exists(os.path.join(unified, "pids.max")):
                for path in made:
                    os.rmdir(path)
                return None
            _write(os.path.join(unified, "pids.max"), pids_max)
            memory = None
            if os.path.exists(os.path.join(unified, "memory.max")):
                _write(os.path.join(unified, "memory.max"), memory_bytes)
                if os.path.exists(os.path.join(unified, "memory.swap.max")):
                    _write(os.path.join(unified, "memory.swap.max"), "0")
                memory = unified
            return cls(made, memory, memory_v2=True)
        except OSError:
            for path in reversed(made):
                _empty_and_remove(path, timeout_s=1.0)
            return None

    def add(self, pid: int) -> None:
        """Move process `pid` into every cgroup of the run."""
        for directory in self.directories:
            _write(os.path.join(directory, "cgroup.procs"), str(pid))

    def kill(self) -> None:
        """SIGKILL every process in the run's cgroups (once)."""
        for directory in self.directories:
            for pid in _cgroup_pids(directory):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def oom_killed(self) -> bool:
        """Whether the memory limit made the kernel kill a process of the run."""
        if self.memory is None:
            return False
        text = _read(os.path.join(self.memory, "memory.events" if self.memory_v2 else "memory.oom_control"))
        counts = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        if "oom_kill" in counts:
            return int(counts["oom_kill"]) > 0
        return (_read(os.path.join(self.memory, "memory.failcnt")).strip() or "0") != "0"

    def remove(self) -> None:
        """Kill whatever is left in the run's cgroups and remove them."""
        for directory in self.directories:
            _empty_and_remove(directory)


# --- one run -------------------------------------------------------------------------------------------------------


def _relative(path: str, what: str) -> str:
    """`path` checked to be a plain relative path inside the working directory; raises SandboxError if not."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise SandboxError(f"{what} paths must be non-empty strings, got {path!r}")
    parts = path.split("/")
    if path.startswith("/") or ".." in parts:
        raise SandboxError(f"{what} paths must be relative and stay inside the working directory, got {path!r}")
    normal = "/".join(part for part in parts if part not in ("", "."))
    if not normal:
        raise SandboxError(f"{what} paths must name a file inside the working directory, got {path!r}")
    return normal


def _write_files(workdir: str, files: Mapping[str, bytes | str]) -> None:
    for name, content in files.items():
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, bytes | bytearray | memoryview):
            raise SandboxError(f"files[{name!r}] must be bytes or str, got {type(content).__name__}")
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def _collect(workdir: str, names: Sequence[str], cap: int) -> dict[str, bytes]:
    """The regular files `names` in `workdir` (first `cap` bytes each), never following a symlink; missing skipped."""
    found = {}
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for name in names:
        fds = []
        try:
            fds.append(os.open(workdir, flags | os.O_DIRECTORY))
            parts = name.split("/")
            for part in parts[:-1]:
                fds.append(os.open(part, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
            fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fds[-1])
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            chunks, size = [], 0
            while size < cap:
                chunk = os.read(fd, min(1 << 20, cap - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            found[name] = b"".join(chunks)
        except OSError:
            continue  # missing, a symlink or not a directory on the way: not collected
        finally:
            for fd in fds:
                os.close(fd)
    return found


def _remove_tree(path: str) -> None:
    """Remove `path`, first giving back search and write permission on directories the program took them from."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


class _Capture:
    """One output stream: the first `cap` bytes, how many came in all, and the last few KB (to spot MemoryError)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.data = bytearray()
        self.total = 0
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.tail = (self.tail + chunk)[-4096:]


def _command(backend: str, tool: str, workdir: str, config: dict, limits: Limits) -> list[str]:
    """The argv that starts the sandbox's init inside the namespaces."""
    # marshal (version 4, read by every Python 3) rather than json: importing json would double the init's start-up.
    init = [config["python"], "-I", "-S", "-c", _INIT, marshal.dumps(config, 4).hex()]
    if backend == "unshare":
        namespaces = ["--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
        return [tool, *namespaces, "--net", "--ipc", "--uts", "--", *init]
    known = _bwrap_options(tool)
    size = ["--size", str(limits.memory_mb << 20)] if "--size" in known else []
    sticky = ["--perms", "1777"] if "--perms" in known else []
    cmd = [tool, "--unshare-all", "--die-with-parent", "--new-session"]
    cmd += ["--cap-drop", "ALL"] if os.geteuid() == 0 else []
    # A read-only /proc: as root, bwrap leaves /proc/sys writable, and the host's sysctls trust uid 0.
    cmd += ["--ro-bind", "/", "/", "--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
    cmd += [*sticky, *size, "--tmpfs", "/tmp", *sticky, *size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    cmd += ["--tmpfs", "/run", "--remount-ro", "/run"] if os.path.isdir("/run") else []
    cmd += ["--bind", workdir, workdir, "--chdir", workdir, "--hostname", HOSTNAME, "--", *init]
    return cmd


def _parse_status(data: bytes) -> dict:
    """The init's status lines ("ready", "exit CODE CPU", "signal SIG CPU", "error TEXT", "exec_error TEXT").

    Under bwrap the program shares the init's uid and could write lines too, so an ending (exit, signal, error)
    replaces every earlier one: the init writes the last after the namespace's other processes are dead.
    """
    messages: dict = {}
    for line in data.decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        try:
            if kind == "ready":
                messages["ready"] = True
            elif kind in ("exit", "signal"):
                value, cpu = rest.split()
                for ending in ("exit", "signal", "error"):
                    messages.pop(ending, None)
                messages[kind], messages["cpu"] = int(value), float(cpu)
            elif kind == "error":
                for ending in ("exit", "signal"):
                    messages.pop(ending, None)
                messages[kind] = rest
            elif kind == "exec_error":
                messages[kind] = rest
        except ValueError:
            pass
    if messages.get("exit") != 127:  # the program's own exec failure ends with exit 127
        messages.pop("exec_error", None)
    return messages


def _classify(
    killed: str | None,
    messages: dict,
    returncode: int | None,
    stderr: _Capture,
    oom: bool,
    limits: Limits,
    backend: str,
) -> tuple[str, int | None, int | None, str]:
    """(status, exit code, signal, reason) of a finished run."""
    code, sig = messages.get("exit"), messages.get("signal")
    if killed == "timeout":
        return "timeout", None, signal.SIGKILL, f"killed after {limits.wall_s:g} s wall time limit"
    if killed in ("stdout", "stderr"):
        limit = OUTPUT_KILL_FACTOR * limits.max_output_bytes
        return "output_limit", None, signal.SIGKILL, f"killed after writing more than {limit} bytes to {killed}"
    if "error" in messages:
        return "sandbox_error", None, None, messages["error"]
    if not messages.get("ready"):
        lines = bytes(stderr.tail).decode(errors="replace").strip().splitlines()
        said = f": {lines[-1]}" if lines else ""
        return "sandbox_error", None, None, f"{backend} failed to start the sandbox (exit {returncode}){said}"
    if "exec_error" in messages:
        return "error", 127, None, f"could not execute the program: {messages['exec_error']}"
    memory_error = b"MemoryError" in stderr.tail or b"Cannot allocate memory" in stderr.tail
    if oom or (memory_error and code != 0):
        why = "killed by the out-of-memory killer" if oom else "ran out of memory"
        return "memory_limit", code, sig, f"{why} at the {limits.memory_mb} MB memory limit"
    if code is None and sig is None:
        return "sandbox_error", None, None, f"the sandbox's init ended without a status ({backend} exit {returncode})"
    cpu = messages.get("cpu", 0.0)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= math.ceil(limits.cpu_s)):
        return "cpu_limit", None, sig, f"killed after {cpu:.1f} s of CPU time (limit {limits.cpu_s:g} s)"
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "signal", None, sig, f"killed by signal {name}"
    return ("ok" if code == 0 else "error"), code, None, f"exited with status {code}"


def run(
    argv: Sequence[str],
    *,
    stdin: bytes | str = b"",
    files: Mapping[str, bytes | str] = _NO_FILES,
    collect: Sequence[str] = (),
    limits: Limits = _DEFAULT_LIMITS,
    backend: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run `argv` isolated in a fresh working directory and return how it ended.

    argv: the program and its arguments (argv[0] is looked up on PATH=/usr/local/bin:/usr/bin:/bin).
    stdin: fed to the program's standard input (str is UTF-8 encoded), then closed.
    files: relative path -> content, written into the working directory before the run.
    collect: relative paths read back from the working directory after the run (into Result.files).
    limits: the resource limits; backend: "bwrap", "unshare" or None (the first of `backends()`).
    env: extra environment variables on top of the clean environment.
    Returns a Result; failures of the program (and of the sandbox machinery once started) are statuses, not errors.
    Raises SandboxError for bad arguments or when this machine cannot isolate programs.
    """
    argv = list(argv) if not isinstance(argv, str) else [argv]
    if not argv or not all(isinstance(arg, str) and "\0" not in arg for arg in argv) or not argv[0]:
        raise SandboxError(f"argv must be a non-empty sequence of strings without NUL bytes, got {argv!r}")
    if isinstance(stdin, str):
        stdin = stdin.encode()
    if not isinstance(limits, Limits):
        raise SandboxError(f"limits must be a Limits, got {type(limits).__name__}")
    files = {_relative(name, "files"): content for name, content in files.items()}
    collect = [_relative(name, "collect") for name in collect]
    backend, tool = _choose_backend(backend)
    python = python_executable()
    root = os.geteuid() == 0

    workdir = tempfile.mkdtemp(prefix="cwm-sandbox-")
    cgroup = proc = None
    pipes: list[int] = []
    try:
        os.chmod(workdir, 0o700)
        _write_files(workdir, files)
        clean_env = _clean_env(workdir, env)
        cgroup = _Cgroup.create(limits, HELPERS[backend])
        if cgroup is None and root:
            raise SandboxError(
                "running as root, but no pids cgroup can be created (cgroup v1 /sys/fs/cgroup/pids or a cgroup v2 "
                "hierarchy with the pids controller): a fork bomb could not be contained; mount a writable cgroup "
                "file system or run as an unprivileged user"
            )
        use_as = cgroup is None or cgroup.memory is None
        nproc = limits.max_procs + 2
        rlimits = [
            ("RLIMIT_CPU", math.ceil(limits.cpu_s), math.ceil(limits.cpu_s) + 1),
            ("RLIMIT_FSIZE", limits.max_file_mb << 20, limits.max_file_mb << 20),
            ("RLIMIT_NPROC", nproc, nproc),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NOFILE", 256, 256),
        ] + ([("RLIMIT_AS", limits.memory_mb << 20, limits.memory_mb << 20)] if use_as else [])
        status_r, status_w = os.pipe()
        life_r, life_w = os.pipe()
        pipes += [status_r, status_w, life_r, life_w]
        config = {
            "python": python,
            "argv": argv,
            "env": clean_env,
            "workdir": workdir,
            "mount": backend == "unshare",
            "drop_caps": backend == "unshare",
            "hostname": HOSTNAME,
            "tmpfs_size": limits.memory_mb << 20,
            "rlimits": rlimits,
            "status_fd": status_w,
            "life_fd": life_r,
        }
        cmd = _command(backend, tool, workdir, config, limits)
        if cgroup is not None:
            # Wait until the parent has put this process in the cgroup, so everything forked after is inside.
            cmd = ["/bin/sh", "-c", f'read -r _ < /proc/self/fd/{life_r} && exec "$@"', "sh", *cmd]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w, life_r),
                env=clean_env,
                cwd=workdir,
                start_new_session=True,
            )
        except OSError as exc:
            reason = f"could not start {cmd[0]}: {exc}"
            return Result("sandbox_error", None, None, b"", b"", False, False, 0.0, reason)
        for fd in (status_w, life_r):
            os.close(fd)
            pipes.remove(fd)
        if cgroup is not None:
            cgroup.add(proc.pid)
            os.write(life_w, b"go\n")
        out, err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
        killed, status_bytes = _communicate(proc, stdin, out, err, status_r, start + limits.wall_s, limits)
        if killed:
            _kill(proc, cgroup)
        try:
            proc.wait(timeout=max(0.0, start + limits.wall_s - time.monotonic()) + 1.0)
        except subprocess.TimeoutExpired:
            killed = killed or "timeout"
            _kill(proc, cgroup)
            proc.wait()
        wall = time.monotonic() - start
        messages = _parse_status(status_bytes)
        oom = cgroup.oom_killed() if cgroup is not None else False
        status, code, sig, reason = _classify(killed, messages, proc.returncode, err, oom, limits, backend)
        collected = _collect(workdir, collect, limits.max_collect_bytes)
        return Result(
            status=status,
            exit_code=code,
            signal=sig,
            stdout=bytes(out.data),
            stderr=bytes(err.data),
            stdout_truncated=out.total > len(out.data),
            stderr_truncated=err.total > len(err.data),
            wall_s=wall,
            reason=reason,
            files=collected,
        )
    finally:
        if proc is not None and proc.returncode is None:
            _kill(proc, cgroup)
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr) if proc is not None else ():
            try:
                stream.close()
            except OSError:
                pass
        for fd in pipes:
            os.close(fd)
        if cgroup is not None:
            cgroup.remove()
        _remove_tree(workdir)


def _children(pid: int) -> list[int]:
    """The pids of the children of process `pid` (empty if it is gone)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            found += [int(child) for child in _read(f"/proc/{pid}/task/{task}/children").split()]
    except OSError:
        pass
    return found


def _kill(proc: subprocess.Popen, cgroup: _Cgroup | None, timeout_s: float = 5.0) -> None:
    """SIGKILL the sandbox and wait until its processes are gone.

    The namespace's init is killed first, and waited for through a pidfd: the kernel lets the init of a pid namespace
    finish dying only once every other process of the namespace is gone, while killing just unshare or bwrap (the
    direct child, whose death also takes the namespace down) returns before that.
    """
    pidfds = []
    if proc.returncode is None:  # not yet reaped, so neither its pid nor its children's can have been reused
        for child in _children(proc.pid):
            try:
                pidfds.append(os.pidfd_open(child))
            except OSError:
                continue
            try:
                signal.pidfd_send_signal(pidfds[-1], signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    if cgroup is not None:
        cgroup.kill()
    deadline = time.monotonic() + timeout_s
    try:
        while pidfds and time.monotonic() < deadline:
            readable, _, _ = select.select(pidfds, [], [], max(0.0, deadline - time.monotonic()))
            for fd in readable:  # readable once the process has exited
                pidfds.remove(fd)
                os.close(fd)
    finally:
        for fd in pidfds:
            os.close(fd)


def _communicate(
    proc: subprocess.Popen,
    stdin: bytes,
    out: _Capture,
    err: _Capture,
    status_fd: int,
    deadline: float,
    limits: Limits,
) -> tuple[str | None, bytes]:
    """Feed stdin and read stdout, stderr and the status pipe until all close or a limit is hit.

    Returns (why the sandbox must be killed: "timeout", "stdout", "stderr" or None; the status pipe's bytes).
    """
    status = bytearray()
    captures = {proc.stdout.fileno(): ("stdout", out), proc.stderr.fileno(): ("stderr", err), status_fd: None}
    selector = selectors.DefaultSelector()
    try:
        for fd in captures:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        view, offset = memoryview(stdin), 0
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", bytes(status)
            for key, _ in selector.select(remaining):
                fd = key.fd
                if fd not in captures:
                    try:
                        offset += os.write(fd, view[offset : offset + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed its stdin (or exited): the rest is not wanted
                        offset = len(view)
                    if offset >= len(view):
                        selector.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(fd)
                    continue
                if captures[fd] is None:
                    status += chunk[: max(0, 65536 - len(status))]
                    continue
                name, capture = captures[fd]
                capture.feed(chunk)
                if capture.total > OUTPUT_KILL_FACTOR * limits.max_output_bytes:
                    return name, bytes(status)
        return None, bytes(status)
    finally:
        selector.close()


def run_python(
    code: str,
    *,
    stdin: bytes | str = b"",
    files: Mapping[str, bytes | str] = _NO_FILES,
    collect: Sequence[str] = (),
    limits: Limits = _DEFAULT_LIMITS,
    backend: str | None = None,
    args: Sequence[str] = (),
) -> Result:
    """Run Python source `code` isolated: it is written to main.py and run as `python -I main.py *args`.

    The other arguments are `run`'s; `files` must not contain main.py. Returns the Result.
    """
    if not isinstance(code, str):
        raise SandboxError(f"code must be a str, got {type(code).__name__}")
    if "main.py" in {_relative(name, "files") for name in files}:
        raise SandboxError("files must not contain main.py: run_python writes the code there")
    return run(
        [python_executable(), "-I", "main.py", *args],
        stdin=stdin,
        files={**files, "main.py": code},
        collect=collect,
        limits=limits,
        backend=backend,
    )


# --- many at once --------------------------------------------------------------------------------------------------


class Pool:
    """Runs many sandboxes at once: `workers` threads, each driving one sandboxed process at a time.

    Every run gets its own namespaces, working directory and cgroup, and RLIMIT_NPROC counts per user namespace,
    so concurrent runs do not share limits.
    """

    def __init__(self, workers: int | None = None, *, limits: Limits = _DEFAULT_LIMITS, backend: str | None = None):
        workers = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise SandboxError(f"workers must be a positive integer or None, got {workers!r}")
        if not isinstance(limits, Limits):
            raise SandboxError(f"limits must be a Limits, got {type(limits).__name__}")
        _choose_backend(backend)  # fail here, not in the first job, when nothing can isolate
        self.workers, self.limits, self.backend = workers, limits, backend
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cwm-sandbox")

    def _run(self, job: Job) -> Result:
        if not isinstance(job, Job):
            raise SandboxError(f"Pool runs Job objects, got {type(job).__name__}")
        return run(
            job.argv, stdin=job.stdin, files=job.files, collect=job.collect, limits=self.limits, backend=self.backend
        )

    def map(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """The results of `jobs`, in job order, lazily (at most 2x workers jobs are started ahead of the reader)."""
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        try:
            for job in jobs:
                pending.append(self._executor.submit(self._run, job))
                while len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def imap_unordered(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Result]]:
        """(job index, result) for each of `jobs`, as they finish."""
        pending: dict[concurrent.futures.Future, int] = {}
        jobs = iter(enumerate(jobs))
        try:
            while True:
                for index, job in itertools.islice(jobs, 2 * self.workers - len(pending)):
                    pending[self._executor.submit(self._run, job)] = index
                if not pending:
                    return
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        """Wait for the running jobs, drop the queued ones and stop the threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
