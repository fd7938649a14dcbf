"""Verifier processes with a per-call timeout: pathological LaTeX can hang sympy in C code, where no
signal reaches it, so the only reliable limit is to kill the process. A timed-out or crashed worker
is killed and replaced; its response scores wrong with status `timeout` / `error`. Nothing raises
except a worker that cannot start at all (a broken environment, not a bad response).
"""
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Optional, Sequence

from dapo_megatron.reward.config import default_start_method
from dapo_megatron.types import VerifyResult  # noqa: F401 (re-exported)
from dapo_megatron.reward.registry import as_correct, get_verifier, preload_modules, warm_up

logger = logging.getLogger(__name__)


def verify_one(fn, response: str, ground_truth) -> VerifyResult:
    """Run a verifier on one response; exceptions become an `error` result."""
    if ground_truth is None:
        return VerifyResult(False, "error", "sample has no label (ground truth)")
    try:
        value = fn(response, str(ground_truth))
        score = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        return VerifyResult(as_correct(value), score=score)
    except Exception as e:  # a verifier bug must not take down the step
        return VerifyResult(False, "error", f"{type(e).__name__}: {e}")


def _worker_main(conn, verifier_type: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    try:
        fn = get_verifier(verifier_type)
        warm_up(verifier_type, fn)
    except Exception as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        task_id, response, ground_truth = task
        conn.send((task_id, verify_one(fn, response, ground_truth)))


class _Worker:
    def __init__(self, ctx, verifier_type: str):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, verifier_type), daemon=True)
        self.proc.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.task: Optional[int] = None  # index of the response being verified
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class VerifierPool:
    """`num_workers` processes running one verifier; `map` scores (response, label) pairs in order.

    `num_workers=0` verifies in the calling process: no timeout, for debugging only.
    """

    def __init__(self, verifier_type: str, num_workers: int = 2, timeout_s: float = 5.0,
                 start_method: Optional[str] = None, startup_timeout_s: float = 120.0):
        fn = get_verifier(verifier_type)  # fail fast, in the parent, on a bad `python:` path
        self.verifier_type = verifier_type
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0
        self._lock = threading.Lock()
        self._fn = fn if num_workers == 0 else None
        self._ctx = mp.get_context(start_method or default_start_method())
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(preload_modules())  # no effect if the server already runs
        self._workers = [_Worker(self._ctx, verifier_type) for _ in range(num_workers)]
        self._wait_ready()

    def map(self, pairs: Sequence[tuple[str, object]]) -> list[VerifyResult]:
        if self._fn is not None:
            return [verify_one(self._fn, response, label) for response, label in pairs]
        with self._lock:
            return self._run(pairs)

    def _run(self, pairs) -> list[VerifyResult]:
        results: list[Optional[VerifyResult]] = [None] * len(pairs)
        todo = deque(range(len(pairs)))
        while todo or any(w.task is not None for w in self._workers):
            for i, w in enumerate(self._workers):
                if w.ready and w.task is None and todo:
                    self._dispatch(i, todo, pairs)
            self._poll(results)
        return results

    def _dispatch(self, i: int, todo: deque, pairs) -> None:
        if not self._workers[i].proc.is_alive():  # died while idle (OOM killer, ...): nothing lost yet
            self._replace(i, [], "error", "verifier worker died while idle")
            return
        w, task = self._workers[i], todo.popleft()
        try:
            w.conn.send((task, *pairs[task]))
        except OSError:  # the idle worker died: requeue the response, replace the worker
            todo.appendleft(task)
            self._replace(i, [], "error", "verifier worker died while idle")
            return
        w.task, w.deadline = task, time.monotonic() + self.timeout_s

    def _poll(self, results) -> None:
        deadlines = [w.started_at + self.startup_timeout_s if not w.ready else w.deadline
                     for w in self._workers if not w.ready or w.task is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready = set(wait([w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers], timeout))
        for i, w in enumerate(self._workers):
            if w.conn in ready:
                try:
                    self._receive(w, results)
                    continue
                except (EOFError, OSError):
                    pass  # died mid-reply: handled as a crash below
            if w.proc.sentinel in ready or not w.proc.is_alive():
                if not w.ready:
                    raise RuntimeError(f"verifier worker for reward.type={self.verifier_type} died while starting "
                                       f"(exit code {w.proc.exitcode})")
                self._replace(i, results, "error", f"verifier worker died (exit code {w.proc.exitcode})")
            elif w.task is not None and time.monotonic() >= w.deadline:
                self._replace(i, results, "timeout", f"no verdict within {self.timeout_s}s")
            elif not w.ready and time.monotonic() >= w.started_at + self.startup_timeout_s:
                raise RuntimeError(f"verifier worker for reward.type={self.verifier_type} did not start within "
                                   f"{self.startup_timeout_s}s")

    def _receive(self, w: _Worker, results) -> None:
        msg = w.conn.recv()
        if msg[0] == "fatal":
            raise RuntimeError(f"verifier worker for reward.type={self.verifier_type} failed to start: {msg[1]}")
        if msg[0] == "ready":
            w.ready = True
        elif msg[0] == w.task:
            results[w.task] = msg[1]
            w.task = None

    def _replace(self, i: int, results, status: str, reason: str) -> None:
        w = self._workers[i]
        if w.task is not None:
            results[w.task] = VerifyResult(False, status, reason)
        w.kill()
        self.restarts += 1
        logger.warning("reward: %s; restarting verifier worker %d (%d restarts so far)", reason, i, self.restarts)
        self._workers[i] = _Worker(self._ctx, self.verifier_type)

    def _wait_ready(self) -> None:
        while not all(w.ready for w in self._workers):
            self._poll([])

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(timeout=1)
            w.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
