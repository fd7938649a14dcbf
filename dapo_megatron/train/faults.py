"""Fault injection for the crash tests, off unless DAPO_FAULT is set.

DAPO_FAULT=<point>@<step> SIGKILLs this process when it reaches <point> at that step; DAPO_FAULT=enospc:<point>@<step>
raises "No space left on device" there instead. Points: `train` (mid step), `save_model` (model written, optimizer
not), `save_manifest` (everything but the manifest), `save_latest` (folder renamed, `latest` not yet), `log` (half a
metrics line written).
"""
import errno
import os
import signal


def fault(point: str, step: int) -> bool:
    """Act on a matching DAPO_FAULT; returns True (without acting) for `log`, whose tear the caller makes."""
    spec = os.environ.get("DAPO_FAULT")
    if not spec:
        return False
    if spec == f"enospc:{point}@{step}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if spec != f"{point}@{step}":
        return False
    if point == "log":
        return True
    kill()
    return False


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
