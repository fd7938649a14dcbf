"""Metrics: TensorBoard scalars, a JSONL log and a one-line console summary per step (rank 0 only)."""
import json
import time
from pathlib import Path

SUMMARY_KEYS = [("rollout/reward_mean", "reward"), ("rollout/accuracy", "acc"), ("actor/pg_loss", "loss"),
                ("rollout/response_length_mean", "len"), ("actor/pg_clipfrac_high", "clip_hi"),
                ("actor/entropy", "ent"), ("time/step_s", "s")]


class MetricsLogger:
    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides events of the replayed steps that a crashed run had written
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        log_file = run_dir / "metrics.jsonl"
        if log_file.is_file():  # a resumed run replays the steps after its checkpoint: drop their old lines
            keep = [line for line in log_file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            log_file.write_text("".join(line + "\n" for line in keep))
        self.jsonl = open(log_file, "a")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()
        parts = [f"{short}={scalars[k]:.3f}" for k, short in SUMMARY_KEYS if k in scalars]
        print(f"[step {step}] " + " ".join(parts), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
