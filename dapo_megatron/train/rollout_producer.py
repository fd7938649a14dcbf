"""Fully asynchronous rollouts (`rollout.async_steps: k`, k >= 2): a producer generates continuously, up to k policy
versions ahead of the trainer.

The producer is a thread on rank 0 that runs the rollout stage's event loop for the whole run. It collects batch after
batch into a queue; it may start the batch for step N + j only while the trainer is at step N and j <= k (`_gate`), so
the engines hold version >= N when it starts. Groups still generating when a batch is full are not aborted: they finish
during the next batch (rollout/buffer.py carry mode); and while a batch's last responses finish, the prompts of the next
batches the gate allows are already generating (`_lookahead`), so the long tail does not idle the engines. The bound is
per token: a group with a token sampled by weights older than (its batch's step - k) is stale, and
`rollout.stale_policy` drops it (`rollout/stale_dropped`) or generates it again; `check_staleness` asserts at every step
that no token lags the trainer's version by more than k.

Weight updates happen while the producer generates. With `rollout.partial_rollout` the engines pause in flight
(`/pause_generation` mode retract, SGLang's and the embedded engine's), take the new weights, recompute the requests' KV
cache and continue where they stopped: each token keeps the version that sampled it and its log-prob under that version
(Sample.weight_versions); `rollout/partial_fraction` is the share of the step's responses that crossed an update.
Without it, the embedded engine's update waits for running requests (every response has one version) and SGLang's aborts
them (their groups are generated again).

Resume: a checkpoint (`state_dict`, taken on the producer's loop thread, so it sees one consistent moment) saves the
finished batches not yet trained, the groups kept so far for the batch under way, completed groups not yet looked
at, and the prompts in flight, which are generated again after the resume: every prompt of the epoch is generated to
completion exactly once, kept or dropped, across a kill and a resume. Groups are saved once in a table and referred
to by index, so a group that is both kept and recorded for the rollout dumps is one object again after the resume.
"""
import asyncio
import collections
import contextlib
import copy
import threading
import time

from ..rollout.client import run_sync
from .rollout_ahead import check_staleness

WAIT_S = 1.0  # how often a waiting trainer looks whether the producer thread died
CANCEL_WAIT_S = 30.0  # at close, how long the cancelled generations may take to abort their requests


class RolloutProducer:
    """Rank 0's continuous rollout. Same interface as RolloutAhead; `stage` is train/stages.py's RolloutStage."""

    def __init__(self, stage, async_steps: int, partial_rollout: bool = False, stale_policy: str = "drop"):
        self.stage, self.k, self.partial = stage, async_steps, partial_rollout
        buffer = stage.buffer
        buffer.carry, buffer.stale_policy = True, stale_policy
        buffer.extra_in_flight = self._lookahead
        if partial_rollout:  # SGLang weight-update sessions pause in retract mode, not abort
            stage.client.sync_pause_mode = "retract"
        restored = stage.restored
        groups = restored.get("groups", [])
        self._cv = threading.Condition()
        # finished batches not yet taken: (groups, metrics, seconds)
        self._ready = collections.deque((([groups[g] for g in r["groups"]], r["metrics"], r["seconds"])
                                         for r in restored.get("ready", [])))
        if "generated" in restored:  # the rollout dumps' record of each batch's generated groups
            *done, current = [[groups[g] for g in gen] for gen in restored["generated"]]
            stage.generated.extend(done)
            stage._generated = current
        self._taken = stage.step - len(self._ready)  # batches the trainer has taken (= its step)
        self._stopping, self._error = False, None
        self._loop = stage.loop
        self._wake = None  # an asyncio.Event on the loop: the trainer took a batch, or close()
        self._main = None
        stage.run_on_loop = self._run_on_loop  # eval runs on the producer's loop, beside the rollout
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="dapo-rollout-producer", daemon=True)
        self._thread.start()
        started.wait()

    # ------------------------------------------------------------------ the trainer's side
    def next(self) -> tuple[list, dict]:
        """The oldest finished batch (waits for one), with the staleness and partial-rollout metrics."""
        with self._cv:
            while not self._ready:
                if self._error is not None:
                    raise self._error  # the rollout's own error (a server error, a bad request), as with k <= 1
                if not self._thread.is_alive():
                    raise RuntimeError("the rollout producer thread ended before the run did; this is a bug")
                self._cv.wait(WAIT_S)
            groups, metrics, seconds = self._ready.popleft()
            self._taken += 1
        self._loop.call_soon_threadsafe(self._wake.set)
        samples = [s for g in groups for s in g]
        lag = check_staleness(samples, self.stage.backend.version.value, self.k)
        partial = sum(len(set(s.weight_versions or ())) > 1 for s in samples) / max(len(samples), 1)
        return groups, {**metrics, **lag, "rollout/partial_fraction": partial, "time/rollout_generate_s": seconds}

    def start(self) -> None:
        """Nothing to start: the producer runs all along."""

    def wait(self) -> None:
        """Nothing to wait for: weight updates and eval happen while the producer generates."""

    @contextlib.contextmanager
    def weight_update(self):
        """Around the weight sync: with partial rollouts the engines pause in place (retract) and continue after."""
        if not self.partial:
            yield
            return
        run_sync(self.stage.client.pause_generation("retract"))
        try:
            yield
        finally:
            run_sync(self.stage.client.continue_generation())

    def state_dict(self) -> dict:
        """The rollout state a checkpoint saves now, taken on the loop's thread (one consistent moment)."""
        return self._run_on_loop(self._snapshot())

    def close(self) -> None:
        self._stopping = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_soon)
            self._thread.join()
        self.stage.run_on_loop = self._loop.run_until_complete

    # ------------------------------------------------------------------ the producer's thread
    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._wake = asyncio.Event()
        self._main = self._loop.create_task(self._produce())
        started.set()
        try:
            self._loop.run_until_complete(self._main)
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # the trainer raises it at its next `next()`
            self._error = e
        finally:
            tasks = self.stage.buffer.cancel_in_flight()  # their requests are aborted as they end
            if tasks:
                self._loop.run_until_complete(asyncio.wait(tasks, timeout=CANCEL_WAIT_S))
            with self._cv:
                self._cv.notify_all()

    def _stop_soon(self) -> None:
        self._main.cancel()

    async def _produce(self) -> None:
        while not self._stopping:
            await self._gate()
            batch = self.stage.step  # the step that will train on it
            self.stage.buffer.min_version = batch - self.k  # the version that step trains from, minus k
            t0 = time.perf_counter()
            groups, metrics = await self.stage.acollect()
            with self._cv:  # no await since acollect returned: a snapshot sees it in the buffer or here
                self._ready.append((groups, metrics, time.perf_counter() - t0))
                self._cv.notify_all()

    def _lookahead(self) -> int:
        """Groups of the batches after the one under way whose start the gate already allows: in flight meanwhile,
        they fill the slots its last responses leave (at versions its bound accepts for them)."""
        batches = self._taken + self.k - 1 - self.stage.step
        return max(0, batches) * self.stage.buffer.cfg.rollout_batch_size

    async def _gate(self) -> None:
        """Wait until the batch for step `stage.step` is at most k steps ahead of the trainer's step."""
        while self.stage.step > self._taken + self.k - 1:
            self._wake.clear()
            if self.stage.step <= self._taken + self.k - 1:
                break
            await self._wake.wait()

    def _run_on_loop(self, coro):
        if not self._thread.is_alive():
            return self._loop.run_until_complete(coro)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _snapshot(self) -> dict:
        table, index = [], {}

        def ref(group) -> int:
            if id(group) not in index:
                index[id(group)] = len(table)
                table.append([copy.deepcopy(s.state_dict()) for s in group])
            return index[id(group)]

        stage = self.stage
        state = {"buffer": stage.buffer.state_dict(ref), "step": stage.step, "generated_tokens": stage.generated_tokens}
        with self._cv:
            state["ready"] = [{"groups": [ref(g) for g in groups], "metrics": metrics, "seconds": seconds}
                              for groups, metrics, seconds in self._ready]
        if stage.record_generated:  # the rollout dumps' groups of each finished batch and of the one under way
            state["generated"] = [[ref(g) for g in gen] for gen in [*stage.generated, stage._generated]]
        state["groups"] = table
        return state
