"""Metrics: TensorBoard scalars, a JSONL log, the trackers of trainer.loggers (train/trackers.py) and a one-line
console summary per step (rank 0 only).

metrics.jsonl is append-only, one whole line per write. On resume its lines are checked: a torn last line (a crash
or a full disk while logging) is dropped with a warning, and the replayed steps after the checkpoint are moved to
metrics_replaced.jsonl (kept, not lost). The new file replaces the old one atomically (temp + rename).
"""
import json
import os
import time
from pathlib import Path

from .faults import fault, kill
from .trackers import start_trackers

SUMMARY_KEYS = [("rollout/reward_mean", "reward"), ("rollout/accuracy", "acc"), ("actor/pg_loss", "loss"),
                ("rollout/response_length_mean", "len"), ("actor/pg_clipfrac_high", "clip_hi"),
                ("actor/entropy", "ent"), ("time/step_s", "s")]
REPLACED = "metrics_replaced.jsonl"


class MetricsLogger:
    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True, start_step: int = 0, trainer=None,
                 config: dict = None):
        """`trainer`: the TrainerConfig whose loggers (wandb, mlflow) to start, with `config` as their parameters."""
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.trackers = None  # train/trackers.py TrackerProcess: W&B / MLflow in a process of their own
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if trainer is not None:
            tensorboard = tensorboard and "tensorboard" in trainer.loggers
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides events of the replayed steps that a crashed run had written
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        log_file = run_dir / "metrics.jsonl"
        if log_file.is_file():
            trim_log(log_file, start_step)
        self.jsonl = open(log_file, "a")
        if trainer is not None:
            self.trackers = start_trackers(trainer, run_dir, config or {}, start_step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        line = json.dumps({"step": step, "time": time.time(), **scalars}) + "\n"
        if fault("log", step):  # crash tests: leave half a line, as a kill or a full disk mid-write would
            self.jsonl.write(line[:len(line) // 2])
            self.jsonl.flush()
            kill()
        self.jsonl.write(line)
        self.jsonl.flush()
        if self.trackers is not None:
            self.trackers.log(step, scalars)
        parts = [f"{short}={scalars[k]:.3f}" for k, short in SUMMARY_KEYS if k in scalars]
        print(f"[step {step}] " + " ".join(parts), flush=True)

    def flush(self) -> None:
        """Every step logged so far delivered to the trackers (before a checkpoint: see train/trackers.py)."""
        if self.trackers is not None:
            self.trackers.flush()

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def trim_log(log_file: Path, start_step: int, warn=print) -> None:
    """Keep the whole lines of steps <= start_step; replayed steps go to metrics_replaced.jsonl; atomic rewrite."""
    data = log_file.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; otherwise a torn last line
    keep, replaced = [], []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            step = json.loads(raw).get("step", 0)
        except (ValueError, AttributeError):
            warn(f"warning: {log_file}, line {i} is not a JSON record; dropped")
            continue
        (keep if step <= start_step else replaced).append(raw + b"\n")
    if tail.strip():
        warn(f"warning: {log_file} ends in a torn line (a crash while logging); dropped it")
    if not replaced and not tail.strip() and len(keep) == sum(1 for raw in lines if raw.strip()):
        return
    if replaced:
        with open(log_file.with_name(REPLACED), "ab") as f:
            f.write(b"".join(replaced))
    tmp = log_file.with_name(log_file.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(b"".join(keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, log_file)
    finally:
        tmp.unlink(missing_ok=True)
