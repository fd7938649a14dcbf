"""Engine busy fraction: slots used / slots available over a window (one trainer step), logged per step as
`rollout/engine_busy_fraction` (and `rollout/engine_decode_occupancy`).

A slot is one row of the engine's running batch; an engine has `max_running_requests` of them (the embedded
engine's `max_batch_size`, SGLang's `--max-running-requests`). Over a window of T seconds:

  engine_busy_fraction     = slot-seconds used / (max_running_requests * T), where slot-seconds used is the time
                             integral of the rows resident in the running batch (admitted, not finished; a row
                             frozen by a pause or a weight update counts). Idle time between rollouts, and a long
                             tail that leaves most rows empty, both lower it.
  engine_decode_occupancy  = rows decoded / (max_running_requests * decode steps): how full the decode steps that
                             ran were, whatever the time between them (the long tail alone).

Several engines: sums over engines of numerator and denominator. The engine keeps cumulative counters (`SlotMeter`,
served in /get_server_info as `engine_load`); `EngineLoadMeter` takes the difference of two readings.

Real SGLang has no cumulative counter of this kind: /server_info (/get_server_info) reports
`internal_states[i].effective_max_running_requests_per_dp` (the slots) and the last decode batch's throughput, /v1/loads
and /metrics (`sglang:num_running_reqs`) the rows running at the moment of the call. A busy fraction from them needs
polling during the step; it is not done, and the metric is absent with the sglang backends.
"""
import asyncio
import time
from typing import Callable, Optional

BUSY, OCCUPANCY = "rollout/engine_busy_fraction", "rollout/engine_decode_occupancy"
# They depend on the machine's timing (and a resumed run's first window starts at its start-up): comparisons of a
# run with its resume leave them out, as they leave out time/*.
WALL_CLOCK_METRICS = (BUSY, OCCUPANCY)


class SlotMeter:
    """Cumulative slot accounting of one engine; the engine calls `mark` under its lock at every scheduler step."""

    def __init__(self, slots: int, clock: Callable[[], float] = time.monotonic):
        self.slots, self.clock = int(slots), clock
        self.slot_seconds, self.slot_steps, self.decode_steps = 0.0, 0, 0
        self.rows, self.since = 0, clock()

    def mark(self, rows: int, decoded: int = 0) -> None:
        """The rows resident so far were resident since the last mark; from now on `rows` are. `decoded`: rows a
        decode step just ran (0: no decode step)."""
        now = self.clock()
        self.slot_seconds += self.rows * (now - self.since)
        self.slot_steps += decoded
        self.decode_steps += bool(decoded)
        self.rows, self.since = rows, now

    def stats(self) -> dict:
        self.mark(self.rows)
        return {"max_running_requests": self.slots, "clock_s": self.since, "slot_seconds": self.slot_seconds,
                "slot_steps": self.slot_steps, "decode_steps": self.decode_steps}


def busy_fractions(before: list, after: list) -> dict:
    """The window's metrics from two readings of the same engines (`SlotMeter.stats()` dicts, in engine order)."""
    used = avail = rows = steps = 0.0
    for a, b in zip(before, after):
        used += b["slot_seconds"] - a["slot_seconds"]
        avail += b["max_running_requests"] * (b["clock_s"] - a["clock_s"])
        rows += b["slot_steps"] - a["slot_steps"]
        steps += b["max_running_requests"] * (b["decode_steps"] - a["decode_steps"])
    return {BUSY: used / avail if avail > 0 else 0.0, OCCUPANCY: rows / steps if steps > 0 else 0.0}


class EngineLoadMeter:
    """Per-step busy fractions of a fleet (`client.get_server_info()`); {} where the engines report no counters."""

    def __init__(self, client):
        self.client = client
        self.last: Optional[list] = None
        self.enabled = True

    def sample(self) -> dict:
        """`read` from synchronous code that runs no event loop (the training loop)."""
        return asyncio.run(self.read()) if self.enabled else {}

    async def read(self) -> dict:
        """This window's metrics (since the previous read); {} at the first read."""
        get = getattr(self.client, "get_server_info", None)  # not part of RolloutFleet: an optional capability
        if not self.enabled or get is None:
            self.enabled = False
            return {}
        infos = await get()
        if not infos or any(isinstance(i, dict) and "engine_load" not in i for i in infos):
            self.enabled = False  # SGLang: no counters, stop asking
            return {}
        now = [i["engine_load"] if isinstance(i, dict) else None for i in infos]
        before, self.last = self.last, (None if None in now else now)  # an engine that did not answer: no window
        if before is None or self.last is None or len(before) != len(now):
            return {}
        if any(b["slot_seconds"] < a["slot_seconds"] for a, b in zip(before, now)):
            return {}  # an engine restarted (its counters began again): no window this time
        return busy_fractions(before, now)
