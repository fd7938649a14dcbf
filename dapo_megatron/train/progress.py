"""Rollout progress a cluster user can read: a tqdm bar on a terminal; off a terminal (torchrun, SLURM logs) one
plain line per generation round, or every `interval_s` seconds, whichever comes first."""
import sys
import time


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class RolloutProgress:
    def __init__(self, step: int, total: int, batch_size: int, *, interval_s: float = 30.0, stream=None):
        self.stream = stream or sys.stderr
        self.step, self.total, self.batch_size, self.interval_s = step, total, batch_size, interval_s
        self.started = self.last_print = time.monotonic()
        self.last_round = 0
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"rollout {step}", unit="group", leave=False, dynamic_ncols=True,
                            file=self.stream)

    def __call__(self, kept: int, stats: dict):
        rounds = -(-stats["prompts_consumed"] // self.batch_size)
        acc = stats["correct"] / max(1, stats["responses"])
        if self.bar is not None:
            self.bar.n = min(kept, self.total)
            self.bar.set_postfix(generated=stats["groups_generated"], round=rounds, acc=f"{acc:.2f}")
            return
        now = time.monotonic()
        if rounds == self.last_round and now - self.last_print < self.interval_s and kept < self.total:
            return
        self.last_round, self.last_print = rounds, now
        elapsed = now - self.started
        eta = elapsed / kept * (self.total - min(kept, self.total)) if kept else float("nan")
        print(f"rollout {self.step}: kept {min(kept, self.total)}/{self.total} groups, round {rounds}, "
              f"acc {acc:.2f}, elapsed {_fmt(elapsed)}, eta {_fmt(eta) if kept else '?'}", file=self.stream,
              flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
