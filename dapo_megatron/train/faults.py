"""Fault injection for the crash and engine-fault tests (and tools/ drills), off unless DAPO_FAULT is set.

The one mechanism: `DAPO_FAULT=<point>@<N>`, or several, comma-separated. It is read by the trainer and by the
engines alike (a leaf module: standard library only, so the rollout server imports it too).

Trainer points (N = the step): `train` SIGKILLs mid step, `save_model` (model written, optimizer not),
`save_manifest` (everything but the manifest), `save_latest` (folder renamed, `latest` not yet), `log` (half a metrics
line written); `enospc:<point>@N` raises "No space left on device" there instead. `hold_for_signal@N` (preemption
tests) holds the trainer after that step's metrics until SIGTERM or SIGUSR1 (at most `HOLD_TIMEOUT_S`).
The trackers' process (train/trackers.py) has `tracker`: its delivery of the steps holding N (`enospc:tracker@N`: fails
as a full disk would; `tracker@N`: SIGKILLs that process).

Engine points, acted on by the engine that serves the call (rollout/server.py `dispatch`, in-process or over HTTP):
- `engine_kill@N`: SIGKILL of the engine's process at a generate of step N's rollout (the engine holds version N-1);
  only for engines in processes of their own (an in-process engine would take the trainer with it);
- `engine_hang_generate@N`: that generate never answers (until the caller gives up on it);
- `engine_hang_update@N`: the weight update to version N never answers.
An engine point may name one engine, `<point>@<N>:<engine>` (its index in the plan, $DAPO_ENGINE_INDEX, which the
launch sets for each engine it starts); without it, every engine that serves the call acts.
And one on the trainer's side of the sync: `corrupt_bucket@N`: the first tensor of the first bucket of the sync to
version N arrives off by one (the trainer's own weights are untouched), for the equality check to catch.

An engine restarted by the supervisor gets no DAPO_FAULT (`without_fault`): a fault fires in the first incarnation.
"""
import asyncio
import errno
import os
import signal
import sys
import time

ENV = "DAPO_FAULT"
HOLD_TIMEOUT_S = 600.0
ENGINE_POINTS = ("engine_kill", "engine_hang_generate", "engine_hang_update")


ENGINE_INDEX_ENV = "DAPO_ENGINE_INDEX"  # set by a launch for each engine it starts, for `<point>@<N>:<engine>`


def _spec():
    return os.environ.get(ENV) or None


def _specs() -> set:
    return set((_spec() or "").split(","))


def fault(point: str, step: int) -> bool:
    """Act on a matching trainer point; returns True (without acting) for `log`, whose tear the caller makes."""
    spec = _spec()
    if not spec:
        return False
    if f"enospc:{point}@{step}" in _specs():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if f"{point}@{step}" not in _specs():
        return False
    if point == "log":
        return True
    kill()
    return False


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hold_for_signal(step: int, signalled) -> None:
    """With DAPO_FAULT=hold_for_signal@<step>: wait until `signalled()` (this process got SIGTERM / SIGUSR1)."""
    if f"hold_for_signal@{step}" not in _specs():
        return
    print(f"DAPO_FAULT: holding after step {step} until SIGTERM or SIGUSR1", file=sys.stderr, flush=True)
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not signalled():
        if time.monotonic() > deadline:
            raise RuntimeError(f"DAPO_FAULT=hold_for_signal@{step}: no SIGTERM or SIGUSR1 within "
                               f"{HOLD_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _engine_point(point: str, version) -> bool:
    try:
        at = f"{point}@{int(version)}"
    except (TypeError, ValueError):
        return False
    specs = _specs()
    return at in specs or f"{at}:{os.environ.get(ENGINE_INDEX_ENV)}" in specs


async def engine_fault(path: str, payload, weight_version: int) -> None:
    """The engine's side (rollout/server.py dispatch): act on a matching engine point before serving `path`."""
    if not _spec():
        return
    if path == "/generate" and _engine_point("engine_kill", weight_version + 1):
        print(f"DAPO_FAULT=engine_kill@{weight_version + 1}: SIGKILL of engine pid {os.getpid()}", flush=True)
        kill()
    hang = ((path == "/generate" and _engine_point("engine_hang_generate", weight_version + 1)) or
            (path.startswith("/update_weights") and isinstance(payload, dict) and
             _engine_point("engine_hang_update", payload.get("weight_version"))))
    if hang:
        print(f"DAPO_FAULT={_spec()}: {path} hangs (engine pid {os.getpid()})", flush=True)
        await asyncio.sleep(HOLD_TIMEOUT_S)  # cancelled when the caller gives up (timeout, abort)


def hang_update(version: int) -> None:
    """Engine point `engine_hang_update` for an update that does not go through dispatch (in-process tensor sync)."""
    if _engine_point("engine_hang_update", version):
        print(f"DAPO_FAULT={_spec()}: the tensor weight update hangs", flush=True)
        time.sleep(HOLD_TIMEOUT_S)


def corrupt_buckets(buckets, version: int):
    """Trainer point `corrupt_bucket@N`: the first tensor of the sync to version N, off by one, in a copy."""
    if f"corrupt_bucket@{version}" not in _specs():
        yield from buckets
        return
    for i, bucket in enumerate(buckets):
        if i == 0 and bucket:
            name, t = bucket[0]
            print(f"DAPO_FAULT=corrupt_bucket@{version}: {name} sent off by one", flush=True)
            bucket = [(name, t + 1), *bucket[1:]]
        yield bucket


def without_fault(env: dict) -> dict:
    """The environment of a restarted engine: the fault fired in its first incarnation."""
    return {k: v for k, v in env.items() if k != ENV}
