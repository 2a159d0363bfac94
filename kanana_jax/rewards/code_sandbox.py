"""Code verifier: run a candidate Python program (and its tests) in a subprocess sandbox.

Each run gets a fresh temp dir as cwd, `resource` limits (CPU seconds, address space,
process count, file size, no core files), a wall timeout that kills the whole process group,
and (where `unshare -n` works, e.g. as root) an empty network namespace. Inside, a bootstrap
installs an audit hook before any candidate code runs; it stops the process at the first
process spawn (fork/exec/subprocess/os.system: RLIMIT_NPROC does not bind root), socket use,
or write outside the sandbox dir, and refuses raising rlimits, ctypes, tracing and gc introspection.
The pass verdict travels over a private pipe tagged with a per-run random nonce, so a program
that exits early or prints a fake verdict does not pass; the verdict path binds its builtins
before the program runs and builtins are restored before the tests, so monkeypatching `exec`,
`json`, `SystemExit` or `sorted` does not pass either.

Threat model: this stops accidents and the shortcuts a policy finds first during RL; it is
not a boundary against code that walks interpreter frames (`sys._getframe().f_back`) to read
the nonce, nor against objects whose `__eq__` always returns True. Run large untrusted
workloads inside a container as well.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

REASONS = ("passed", "failed", "timeout", "memory", "fork", "forbidden_write", "network",
           "syntax_error", "runtime_error", "output_limit")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits: wall seconds, CPU seconds (default ceil(wall)+1), MiB of address space, bytes of output."""

    timeout_s: float = 2.0
    cpu_s: int | None = None
    memory_mb: int = 512
    output_bytes: int = 1 << 20
    max_procs: int = 4  # extra processes allowed to the uid (binds non-root only; the audit hook binds all)
    network_namespace: bool = True

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.output_bytes < 1024:
            raise ValueError(f"SandboxLimits needs timeout_s > 0, memory_mb >= 64, output_bytes >= 1024; got {self}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run; `reason` is one of REASONS, `details` says what happened."""

    passed: bool
    reason: str
    details: str
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    wall_s: float = 0.0


_BOOTSTRAP = r'''
def _main():
    import builtins, io, json, linecache, os, resource, socket, sys, traceback
    cfg = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    nonce, status_fd = cfg.pop("nonce"), cfg["status_fd"]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = io.TextIOWrapper(io.BytesIO(cfg["stdin"].encode("utf-8")), encoding="utf-8")
    # Everything the verdict path and the hook use is bound here, before candidate code can
    # monkeypatch builtins or modules (json, os.path, builtins.exec, ...).
    _exec, _compile, _isinstance, _str, _bytes, _int = exec, compile, isinstance, str, bytes, int
    _write, _exit, _lstat, _readlink = os.write, os._exit, os.lstat, os.readlink
    _getcwd, _fsdecode = os.getcwd, os.fsdecode
    _pathlike, _getpid, _sys = os.PathLike, os.getpid, sys
    _SystemExit, _MemoryError, _BaseException, _AssertionError, _OSError = (
        SystemExit, MemoryError, BaseException, AssertionError, OSError)
    _format_exc, _format_only = traceback.format_exception, traceback.format_exception_only

    def report(reason, details=""):
        for stream in (_sys.stdout, _sys.stderr):
            try:
                stream.flush()
            except _BaseException:
                pass
        try:
            text = details if _isinstance(details, _str) else "unprintable details"
            _write(status_fd, f"{nonce}\n{reason}\n{text[-3000:]}".encode("utf-8", "replace"))
        finally:
            _exit(0 if reason == "ok" else 3)

    def resolve(path):
        """Absolute path with every symlink resolved (missing tail components kept as they are)."""
        parts = (path if path.startswith("/") else _getcwd() + "/" + path).split("/")
        done, hops = [], 0
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            cand = "/" + "/".join(done + [part])
            try:
                is_link = (_lstat(cand).st_mode & 0o170000) == 0o120000
            except OSError:
                is_link = False
            if is_link and hops < 40:
                hops += 1
                target = _readlink(cand)
                parts = target.split("/") + parts
                if target.startswith("/"):
                    done = []
                continue
            done.append(part)
        return "/" + "/".join(done)

    root = resolve(cfg["sandbox_dir"])
    for res, soft, hard in ((resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),
                            (resource.RLIMIT_AS, cfg["mem_bytes"], cfg["mem_bytes"]),
                            (resource.RLIMIT_FSIZE, cfg["fsize"], cfg["fsize"]),
                            (resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"]),
                            (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(res, (soft, hard))

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    af_unix = socket.AF_UNIX
    proc_events = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                   "subprocess.Popen", "pty.spawn", "os.startfile"}
    net_events = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                  "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
                  "socket.getnameinfo", "socket.sethostname"}
    fs_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.link", "os.chmod", "os.chown",
                 "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
                 "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.move", "shutil.chown", "shutil.make_archive"}
    dst_events = {"os.symlink", "shutil.copyfile", "shutil.copymode", "shutil.copystat"}
    refused = {"resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile",
               "sys.monitoring.register_callback", "sys._current_frames", "gc.get_objects", "gc.get_referrers",
               "gc.get_referents"}

    def outside(path):
        if path is None or _isinstance(path, _int):
            return False
        try:
            full = resolve(_fsdecode(path))
        except (TypeError, ValueError):
            return False
        return not (full == root or full.startswith(root + "/") or full == "/dev/null")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (_isinstance(mode, _str) and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
                _isinstance(flags, _int) and flags > 0 and flags & write_flags)
            if writing and outside(path):
                report("forbidden_write", f"open({path!r}, {mode or flags!r}) outside the sandbox dir")
        elif event in proc_events:
            report("fork", f"{event} is not allowed in the sandbox")
        elif event == "socket.__new__":
            if args[1] != af_unix:
                report("network", f"socket(family={args[1]}) is not allowed in the sandbox")
        elif event in net_events:
            report("network", f"{event} is not allowed in the sandbox")
        elif event in fs_events or event in dst_events:
            for p in (args[1:2] if event in dst_events else args):
                if _isinstance(p, (_str, _bytes, _pathlike)) and outside(p):
                    report("forbidden_write", f"{event}({p!r}) outside the sandbox dir")
        elif event == "import":
            if args[0] == "_posixsubprocess":
                report("fork", "subprocess is not allowed in the sandbox")
            if args[0] in ("_ctypes", "ctypes") or args[0].startswith("_test"):
                raise ImportError(f"{args[0]} is disabled in the sandbox")
        elif event in refused:
            raise PermissionError(f"{event} is disabled in the sandbox (resource limits, tracing, gc introspection)")
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (0, _getpid()):
                raise PermissionError("signalling other processes is disabled in the sandbox")

    namespace = {"__name__": cfg["module_name"], "__builtins__": builtins}
    builtins_dict = vars(builtins)
    builtins_snapshot = dict(builtins_dict)

    def restore_builtins():
        """Undo the program's monkeypatching of builtins before the tests run."""
        builtins_dict.update(builtins_snapshot)
        for extra in [k for k in builtins_dict if k not in builtins_snapshot]:
            del builtins_dict[extra]
        namespace["__builtins__"] = builtins

    def run(src, name):
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        try:
            code = _compile(src, name, "exec")
        except (SyntaxError, ValueError) as err:
            report("syntax_error", "".join(_format_only(err)))
        try:
            _exec(code, namespace)
        except _SystemExit as err:  # exiting is a normal end of the program, never of the tests
            if name == "<tests>" or err.code not in (None, 0):
                report("runtime_error", f"SystemExit raised in {name}")
        except _MemoryError:
            report("memory", f"MemoryError in {name}")
        except _BaseException as err:
            if _isinstance(err, _OSError) and err.errno == 27:  # EFBIG: RLIMIT_FSIZE hit
                report("output_limit", f"file size limit hit in {name}")
            try:
                text = "".join(_format_exc(type(err), err, err.__traceback__.tb_next))
            except _BaseException:
                text = f"exception in {name}"
            failed = _isinstance(err, _AssertionError) and name == "<tests>"
            report("failed" if failed else "runtime_error", text)

    os.chdir(root)
    sys.addaudithook(hook)
    run(cfg["program"], "<candidate>")
    if cfg["tests"]:
        restore_builtins()
        run(cfg["tests"], "<tests>")
    report("ok")

_main()
'''


@functools.lru_cache(maxsize=None)
def _netns_prefix() -> tuple[str, ...]:
    """('unshare', '-n') when this process may create a network namespace, else ()."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-n") if ok else ()


def network_namespace_available() -> bool:
    """Whether sandboxed runs get an empty network namespace (needs root or user namespaces)."""
    return bool(_netns_prefix())


def _nproc_limit(extra: int) -> int:
    """RLIMIT_NPROC value: processes this uid already runs plus `extra` (root ignores the limit)."""
    uid = os.getuid()
    if uid == 0:
        return extra
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                count += os.stat(f"/proc/{pid}").st_uid == uid
            except OSError:
                pass
    return count + extra


def _read_capped(path: str, cap: int) -> tuple[str, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(cap)
    return data.decode("utf-8", errors="replace"), size


def _same_output(got: str, want: str) -> bool:
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip("\n").splitlines()).strip()  # noqa: E731
    return norm(got) == norm(want)


def run_python(program: str, tests: str = "", *, stdin: str = "", expected_stdout: str | None = None,
               limits: SandboxLimits = SandboxLimits(), python: str = sys.executable) -> SandboxResult:
    """Run `program` then `tests` (assert statements, same namespace) in a fresh sandbox process.

    With no tests the program runs as `__main__` (stdin/stdout tasks; compare with
    `expected_stdout`); with tests it runs as module `candidate` so demo `__main__` blocks stay quiet.
    """
    try:
        compile(tests, "<tests>", "exec")
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"the task's tests do not compile ({err}); fix the test code, not the candidate") from None
    try:
        compile(program, "<candidate>", "exec")
    except (SyntaxError, ValueError) as err:
        return SandboxResult(False, "syntax_error", f"{type(err).__name__}: {err}")
    cpu_s = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    root = tempfile.mkdtemp(prefix="kj_sandbox_")
    work = os.path.join(root, "work")
    os.mkdir(work)
    out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    status_r, status_w = os.pipe()
    nonce = secrets.token_hex(16)
    cfg = {"nonce": nonce, "status_fd": status_w, "sandbox_dir": work, "stdin": stdin, "program": program,
           "tests": tests, "module_name": "candidate" if tests.strip() else "__main__", "cpu_s": cpu_s,
           "mem_bytes": limits.memory_mb << 20, "fsize": limits.output_bytes,
           "nproc": _nproc_limit(limits.max_procs)}
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    prefix = _netns_prefix() if limits.network_namespace else ()
    cmd = [*prefix, python, "-I", "-S", "-B", "-c", _BOOTSTRAP]
    timed_out = False
    start = time.monotonic()
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env,
                                    pass_fds=(status_w,), start_new_session=True)
        os.close(status_w)
        status_w = -1
        try:
            proc.communicate(json.dumps(cfg).encode("utf-8"), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BrokenPipeError:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: nothing the program started survives
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        wall_s = time.monotonic() - start
        fcntl.fcntl(status_r, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            raw = os.read(status_r, 1 << 16)
        except BlockingIOError:
            raw = b""
        stdout, out_size = _read_capped(out_path, limits.output_bytes)
        stderr, err_size = _read_capped(err_path, limits.output_bytes)
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
        shutil.rmtree(root, ignore_errors=True)
    reason, details = _classify(raw, nonce, proc.returncode, timed_out, wall_s, cpu_s, stderr, limits)
    if max(out_size, err_size) >= limits.output_bytes:
        reason, details = "output_limit", f"output reached the {limits.output_bytes}-byte cap"
    if reason == "passed" and expected_stdout is not None and not _same_output(stdout, expected_stdout):
        reason, details = "failed", f"stdout differs from the expected output; got {stdout[:200]!r}"
    return SandboxResult(reason == "passed", reason, details, stdout, stderr, proc.returncode, wall_s)


def _classify(raw: bytes, nonce: str, rc: int | None, timed_out: bool, wall_s: float, cpu_s: int,
              stderr: str, limits: SandboxLimits) -> tuple[str, str]:
    """Reason and details from the status message, the exit status and the timing."""
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.timeout_s} s exceeded"
    got_nonce, _, rest = raw.decode("utf-8", errors="replace").partition("\n")
    if raw and got_nonce == nonce:  # status message: nonce, reason, details (one write by the bootstrap)
        reason, _, details = rest.partition("\n")
        reason = "passed" if reason == "ok" else reason
        return (reason if reason in REASONS else "runtime_error"), details
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and wall_s >= cpu_s):
            return "timeout", f"CPU time limit of {cpu_s} s exceeded"
        if sig == signal.SIGXFSZ:
            return "output_limit", f"file size limit of {limits.output_bytes} bytes exceeded"
        if sig == signal.SIGKILL or re.search(r"MemoryError|Cannot allocate memory|out of memory", stderr):
            return "memory", f"killed by signal {signal.Signals(sig).name} (memory limit {limits.memory_mb} MiB)"
        return "runtime_error", f"killed by signal {signal.Signals(sig).name}"
    if rc == 0:
        return "failed", "the program exited before the tests finished (no verdict from the sandbox)"
    return "runtime_error", f"exit status {rc} without a verdict: {stderr[-500:]}"


def run_many(jobs: Sequence[dict], max_workers: int | None = None) -> list[SandboxResult]:
    """Run `run_python(**job)` for each job dict on a thread pool (each run is its own process)."""
    workers = max_workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_python(**job), jobs))


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """Python source from a response: the last fenced python block (defining `entry_point` if given)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(response)]
    if not blocks:
        return response.strip() + "\n"
    python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")] or [b for _, b in blocks]
    if entry_point is not None:
        defining = [b for b in python if re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(entry_point)}\b",
                                                   b, re.MULTILINE)]
        python = defining or python
    return python[-1]


def code_reward(response: str, tests: str, entry_point: str | None = None,
                limits: SandboxLimits = SandboxLimits()) -> float:
    """1.0 when the code extracted from `response` passes `tests` in the sandbox, else 0.0."""
    return 1.0 if run_python(extract_code(response, entry_point), tests, limits=limits).passed else 0.0
