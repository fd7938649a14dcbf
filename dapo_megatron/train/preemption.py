"""Preemption: SIGTERM / SIGUSR1 make the trainer finish the current step, save a checkpoint and exit with
`PREEMPTED_EXIT_CODE`, so a scheduler (launch/slurm/dapo.sbatch) can requeue the job and it resumes from `latest`.

The handler only records the signal; the loop asks `requested()` once per step, after the step's metrics are logged.
All ranks agree (max over the world): a signal that reached only some ranks still stops all of them at the same step.
The current step is finished, not aborted, so give the job one step plus one checkpoint save of warning time
(`#SBATCH --signal=B:USR1@<seconds>`).
"""
import contextlib
import signal
import sys

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the sbatch script requeues on exactly this code
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self):
        self.signum = None
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. run() called from a test thread): no handler
                pass

    def _handle(self, signum, frame):
        if self.signum is None:
            print(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint and "
                  f"exiting with code {PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
        self.signum = signum

    def requested(self) -> bool:
        """True on every rank once any rank got a signal. Collective."""
        from .weight_stream import comm_device

        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int64, device=comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(int(flag))

    @contextlib.contextmanager
    def shield_children(self):
        """Helper processes started inside (reward forkserver, resource tracker, verifier workers) keep SIGTERM and
        SIGUSR1 blocked: SLURM signals every process of a step, and the step being finished still needs them.
        (They inherit the mask through fork and exec; they are stopped by closing their pipes or SIGKILL.)"""
        if not hasattr(signal, "pthread_sigmask"):
            yield
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
