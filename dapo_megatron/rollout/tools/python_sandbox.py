"""`python`: run the model's code in a sandboxed subprocess and return what it printed.

The child (set up in `preexec_fn`, before the interpreter starts):
- its own session, killed as a group at the wall-time limit (`ToolLimits.timeout_s`), so children die with it;
- rlimits: CPU seconds (the wall limit, rounded up), address space (`memory_mb`), file size (output and files),
  open files, and processes (a fork bomb stops at the limit; only binding for a non-root user, hence the next point);
- started as root, it drops to `nobody` (with an interpreter nobody can run): it cannot write outside its
  private temp dir (its cwd and $HOME/$TMPDIR)
  except where everyone may write (/tmp, /dev/shm: world-writable directories stay writable);
- a network namespace of its own (unshare(CLONE_NEWNET): no interface but a down loopback), where the machine
  allows it (root or unprivileged user namespaces). Where it does not, `network_isolated()` is False, one warning is
  logged, and the code runs with the machine's network.
Output (stdout and stderr together) goes to a file capped by the file-size rlimit, so a print loop cannot fill memory;
the model reads its first `max_output_chars`. A failure (exception, limit, non-zero exit) is one line: the last line
the code printed, e.g. `MemoryError`.
"""
import ctypes
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache

from . import ToolError, ToolLimits, ToolTimeout, register_tool

log = logging.getLogger(__name__)

_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_NOBODY = 65534
_MAX_PROCS = 64
_MAX_FILE_BYTES = 8 << 20
_LIBC = ctypes.CDLL(None, use_errno=True)


def _unshare_net() -> bool:
    if _LIBC.unshare(_CLONE_NEWNET) == 0:
        return True
    if os.getuid() != 0:  # no CAP_SYS_ADMIN: a user namespace of our own grants it inside
        return _LIBC.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0
    return False


@lru_cache(maxsize=None)
def network_isolated() -> bool:
    """Whether a child can get a network namespace of its own here (probed once, in a throwaway child)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        os._exit(0 if _unshare_net() else 1)
    ok = os.waitpid(pid, 0)[1] == 0
    if not ok:
        log.warning("python tool: this machine allows no network namespace (unshare(CLONE_NEWNET) failed: not root "
                    "and no unprivileged user namespaces); sandboxed code can reach the network")
    return ok


def _drop(uid: int):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


@lru_cache(maxsize=None)
def sandbox_user_and_interpreter() -> tuple:
    """(uid to drop to or None, interpreter): as root, `nobody` with the first interpreter it can run (ours may live
    under a home it cannot read); otherwise our own user and interpreter."""
    if os.getuid() != 0:
        return None, sys.executable
    for exe in dict.fromkeys(x for x in (sys.executable, shutil.which("python3"), "/usr/bin/python3") if x):
        try:
            ok = subprocess.run([exe, "-I", "-c", "pass"], preexec_fn=lambda: _drop(_NOBODY), timeout=60,
                                stdin=subprocess.DEVNULL, capture_output=True).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return _NOBODY, exe
    log.warning("python tool: user nobody can run no Python interpreter here; sandboxed code runs as root and can "
                "write wherever root can")
    return None, sys.executable


def _preexec(limits: ToolLimits, isolate_net: bool, drop_to: int):
    def setup():  # runs in the child after fork: only async-signal-safe-ish calls, no logging
        os.setsid()
        if isolate_net and not _unshare_net():
            os._exit(126)
        cpu = int(math.ceil(limits.timeout_s)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        mem = limits.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_MAX_FILE_BYTES, _MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_NPROC, (_MAX_PROCS, _MAX_PROCS))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails (EFBIG) instead of killing
        if drop_to is not None:
            _drop(drop_to)
    return setup


def run_code(code: str, limits: ToolLimits) -> tuple[str, int]:
    """(output, exit status) of `code`; raises ToolTimeout past the wall-time limit."""
    uid, exe = sandbox_user_and_interpreter()
    workdir = tempfile.mkdtemp(prefix="dapo_tool_")
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        script = os.path.join(workdir, "main.py")
        with open(script, "w") as f:
            f.write(code)
        out_path = os.path.join(workdir, ".output")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONIOENCODING": "utf-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        with open(out_path, "wb") as out:
            if uid is not None:
                os.chown(out_path, uid, uid)
            proc = subprocess.Popen([exe, "-I", "main.py"], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, close_fds=True,
                                    preexec_fn=_preexec(limits, network_isolated(), uid))
            try:
                status = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise ToolTimeout(f"python ran longer than {limits.timeout_s:g}s") from None
            finally:
                _kill_group(proc)  # children it left behind
        with open(out_path, "rb") as f:
            text = f.read(max(limits.max_output_chars * 4, 4096)).decode("utf-8", "replace")
        if status == 126:
            raise ToolError("the sandbox could not isolate the network")
        return text, status
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@register_tool("python", arg="code",
               description="Run a Python program and return what it prints (no network, limited time and memory).")
def python(args: dict, limits: ToolLimits) -> str:
    code = args.get("code")
    if not isinstance(code, str):
        raise ToolError('python takes {"code": "<python source>"}')
    text, status = run_code(code, limits)
    if status == 0:
        return text
    if status < 0:  # killed by a signal: SIGXCPU at the CPU limit, SIGKILL, SIGSEGV
        name = signal.Signals(-status).name
        why = "CPU time limit" if name == "SIGXCPU" else name
        raise ToolError(f"{why}{': ' + _last_line(text) if _last_line(text) else ''}")
    raise ToolError(_last_line(text) or f"exit status {status}")
