"""Supervision of the engines this launch starts in processes of their own (docs/fault_tolerance.md)."""
import atexit
import collections
import logging
import os
import signal
import subprocess
import threading
import time

from ..train.faults import without_fault
from .client import EnginesLost, _healthy
from .server import log_tail

log = logging.getLogger(__name__)


HEALTH_TIMEOUT_S, HEALTH_MISSES = 5.0, 3


class EngineRestartsExhausted(EnginesLost):
    """An engine died or hung more often than the supervisor's bound; one line naming it, its log and the fix."""


class EngineSupervisor:
    """Watches engines this launch started in processes of their own (the embedded HTTP server in subprocess mode):
    each one's process and `/health`, every `health_interval_s`, in a thread. A dead or hung engine (the client
    reports a generate past its request timeout: `report_hung`) is killed by its PID, started again with the same
    arguments (`launch(index, env)`, its environment without DAPO_FAULT), given the current weights (`catch_up(url)`:
    with disk sync it loads the last synced folder at that version) and put back behind the client, which waits for
    it (`wait_up`) and generates the lost requests again. More than `max_restarts` restarts within `window_s`:
    `failure` holds the one line (engine, last log lines, fix) and every waiter wakes up to raise it."""

    def __init__(self, launch, count: int, *, catch_up=None, health_interval_s: float = 5.0,
                 max_restarts: int = 3, window_s: float = 3600.0):

        self.launch, self.catch_up, self.interval_s = launch, catch_up, health_interval_s
        self.max_restarts, self.window_s = max_restarts, window_s
        self.servers = [launch(i, None) for i in range(count)]
        self.urls = [s.url for s in self.servers]
        self.restarts, self.failure = 0, None
        self._recent = collections.deque()
        self._up = [threading.Event() for _ in self.servers]
        for e in self._up:
            e.set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)  # a run that ends in an error leaves no engine process behind

    def _watch(self):
        misses = [0] * len(self.servers)
        while not self._stop.wait(self.interval_s):
            for i, server in enumerate(list(self.servers)):
                if self._stop.is_set() or self.failure:
                    return
                if server.process.poll() is not None:
                    self._restart(i, server, f"exited with code {server.process.returncode}")
                    continue
                # a busy machine can miss one answer: HEALTH_MISSES in a row, each with HEALTH_TIMEOUT_S, is down
                misses[i] = 0 if _healthy(server.url, max(HEALTH_TIMEOUT_S, self.interval_s)) else misses[i] + 1
                if misses[i] >= HEALTH_MISSES:
                    misses[i] = 0
                    self._restart(i, server, f"did not answer /health {HEALTH_MISSES} times in a row")

    def suspect(self, url: str) -> None:
        """The client could not reach `url`: its requests wait (`wait_up`) until its process is found dead and
        started again, or alive after HEALTH_TIMEOUT_S (a dropped connection; /health is the watch thread's)."""
        if url not in self.urls or self.failure:  # past the bound: nothing will set it again, the waiter must raise
            return
        i = self.urls.index(url)
        server = self.servers[i]
        self._up[i].clear()
        threading.Thread(target=self._settle, args=(i, server), daemon=True).start()

    def _settle(self, i: int, server) -> None:
        try:
            server.process.wait(timeout=HEALTH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if self.servers[i] is server:
                self._up[i].set()
            return
        self._restart(i, server, f"exited with code {server.process.returncode}")  # no-op if restarted meanwhile

    def report_hung(self, url: str, why: str = "hung in a generate past rollout.request_timeout_s") -> None:
        """The client's word that `url` ran past a deadline (a generate, a weight update): restart that engine; on
        return it is back, caught up (or `failure` says why not)."""
        if url in self.urls:
            i = self.urls.index(url)
            self._restart(i, self.servers[i], why)
        if self.failure:
            raise EngineRestartsExhausted(self.failure)

    def _restart(self, i: int, seen, why: str) -> None:
        """Restart engine i if it is still the process `seen` misbehaving (not one already started again)."""


        with self._lock:
            if self.failure or self._stop.is_set() or self.servers[i] is not seen:
                if self.failure:  # a suspect() that raced the failure: its waiters wake up and raise
                    self._up[i].set()
                return
            self._up[i].clear()
            old = self.servers[i]
            now = time.monotonic()
            while self._recent and now - self._recent[0] > self.window_s:
                self._recent.popleft()
            if len(self._recent) >= self.max_restarts:
                tail = " | ".join(log_tail(old.log_path, 3).splitlines())
                self.failure = (f"engine {i} at {old.url} {why}, past {self.max_restarts} restart(s) within "
                                f"{self.window_s:g} s; its last log lines: {tail}; fix what kills it (memory, the "
                                f"model, the node), then resume from the last checkpoint")
                for e in self._up:
                    e.set()  # waiters wake up and raise
                return
            self._recent.append(now)
            log.warning("engine %d at %s %s: restarting it", i, old.url, why)
            if hasattr(old, "kill"):  # an SGLang server: its process group (scheduler, detokenizer) with it
                old.kill()
            elif old.process.poll() is None:
                os.kill(old.process.pid, signal.SIGKILL)  # by its PID: a hung engine does not answer SIGTERM
            old.process.wait()
            try:
                server = self.launch(i, without_fault(dict(os.environ)))
                if self.catch_up is not None:
                    self.catch_up(server.url)
            except Exception as e:  # noqa: BLE001 - a restart that fails is the run's end, in one line
                self.failure = (f"engine {i} at {old.url} {why} and could not be restarted: "
                                f"{' '.join(str(e).split())[:300]}")
                for ev in self._up:
                    ev.set()
                return
            self.servers[i] = server
            self.restarts += 1
            self._up[i].set()

    def settle(self, timeout_s: float) -> None:
        """Before (and after a failed) control call to every engine, a weight update: an engine found dead now is
        restarted now, and one being restarted is waited for (bounded), so the call reaches every engine caught up."""
        for i, server in enumerate(list(self.servers)):
            if server.process.poll() is not None:
                self._restart(i, server, f"exited with code {server.process.returncode}")
        deadline = time.monotonic() + timeout_s
        for up in self._up:
            up.wait(max(0.0, deadline - time.monotonic()))
        if self.failure:
            raise EngineRestartsExhausted(self.failure)

    async def wait_up(self, url: str, timeout_s: float) -> None:
        """Until `url`'s engine is back (or the supervisor gave up: EngineRestartsExhausted); bounded."""
        import asyncio

        if url not in self.urls:  # a router in front: the requests it loses are the client's to retry
            return
        i = self.urls.index(url)
        await asyncio.to_thread(self._up[i].wait, timeout_s)
        if self.failure:
            raise EngineRestartsExhausted(self.failure)

    def shutdown(self):
        atexit.unregister(self.shutdown)
        self._stop.set()
        self._thread.join(timeout=30)
        for server in self.servers:
            server.shutdown()
