"""Overhead of fault tolerance on the toy run's step time: engine supervision and the weight-sync equality check,
each against the same run without it, side by side in one invocation (docs/fault_tolerance.md; goal: under 2%).

    python tools/bench_faults_overhead.py [--steps 20] [--warmup 3] [--repeats 2] [--out runs/bench_faults]

The toy DAPO run (examples/toy/config.yaml, its warm-started model and data) in four variants:
  http_unwatched  rollout.backend=embedded_http with rollout.health_interval_s=3600 (the watch thread never wakes)
  http_watched    the same with the default supervision (process + /health every rollout.health_interval_s=5 s)
  tensor          rollout.backend=embedded (tensor sync), no check
  tensor_check    the same with rollout.check_weight_sync=N (--check-every, default 1: every sync, the worst case)
Supervision is measured on embedded_http (the backend it runs on), the check on the embedded engine. Step time is the
wall time between consecutive metrics.jsonl records, median over the steps after --warmup; the variants run in turn
--repeats times (interleaved, to spread machine drift). Prints each median and the two ratios.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_observability import prepare  # noqa: E402 - the toy model and data, made once under --out


def step_times(run_dir: Path, model: Path, data: Path, steps: int, extra: list) -> list[float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(REPO / "examples/toy/config.yaml"),
           f"model.path={model}", f"data.path={data}", f"trainer.run_dir={run_dir}", f"trainer.num_steps={steps}",
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--check-every", type=int, default=1)
    p.add_argument("--out", default="runs/bench_faults")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data = prepare(out)
    variants = {"http_unwatched": ["rollout.backend=embedded_http", "rollout.health_interval_s=3600"],
                "http_watched": ["rollout.backend=embedded_http"],
                "tensor": ["rollout.backend=embedded"],
                "tensor_check": ["rollout.backend=embedded", f"rollout.check_weight_sync={args.check_every}"]}
    times = {k: [] for k in variants}
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(args.repeats):
        for name, extra in variants.items():
            dts = step_times(out / name, model, data, args.steps, extra)[args.warmup:]
            times[name] += dts
            print(f"repeat {r + 1} {name:14s}: median step {statistics.median(dts):.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedian wall time per step over {len(times['tensor'])} steps each: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    for on, off, what in (("http_watched", "http_unwatched", "supervision"),
                          ("tensor_check", "tensor", f"check_weight_sync={args.check_every}")):
        ratio = med[on] / med[off]
        print(f"{what}: {on}/{off} = {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
