"""Fault injection for the crash tests, off unless DAPO_FAULT is set.

DAPO_FAULT=<point>@<step> SIGKILLs this process when it reaches <point> at that step; DAPO_FAULT=enospc:<point>@<step>
raises "No space left on device" there instead. Points: `train` (mid step), `save_model` (model written, optimizer
not), `save_manifest` (everything but the manifest), `save_latest` (folder renamed, `latest` not yet), `log` (half a
metrics line written).

DAPO_FAULT=hold_for_signal@<step> (preemption tests) holds the trainer after that step's metrics until it gets
SIGTERM or SIGUSR1 (at most `HOLD_TIMEOUT_S`), so the signal lands mid-run however fast the steps are.
"""
import errno
import os
import signal
import sys
import time

HOLD_TIMEOUT_S = 600.0


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


def hold_for_signal(step: int, signalled) -> None:
    """With DAPO_FAULT=hold_for_signal@<step>: wait until `signalled()` (this process got SIGTERM / SIGUSR1)."""
    if os.environ.get("DAPO_FAULT") != f"hold_for_signal@{step}":
        return
    print(f"DAPO_FAULT: holding after step {step} until SIGTERM or SIGUSR1", file=sys.stderr, flush=True)
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not signalled():
        if time.monotonic() > deadline:
            raise RuntimeError(f"DAPO_FAULT=hold_for_signal@{step}: no SIGTERM or SIGUSR1 within "
                               f"{HOLD_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
