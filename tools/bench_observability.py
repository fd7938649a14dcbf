"""Overhead of watching a run: the toy DAPO run (examples/toy) with every logger and rollout dumps on, against the
default (tensorboard + jsonl), side by side in one invocation.

    python tools/bench_observability.py [--steps 30] [--warmup 3] [--repeats 2] [--out runs/bench_obs]

Both variants train the same warm-started toy model on the same data with examples/toy/config.yaml (rollout.deterministic
on). "all" adds trainer.loggers=[tensorboard,jsonl,wandb,mlflow] (W&B offline, MLflow's local SQLite store),
trainer.dump_rollouts=1 (every step dumped) and an eval every 5 steps on both variants (so eval dumps are written too).
Step time is the wall time between consecutive metrics.jsonl records (it covers logging and the dump hand-off, which
the loop's time/step_s does not), median over the steps after --warmup; the runs alternate default/all --repeats
times to spread machine drift. Prints the medians and the ratio all/default; the last "all" run is left in --out for
`dapo-megatron report`.
"""
import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's dapo_megatron (background_work imports it)


def _toy_module():
    spec = importlib.util.spec_from_file_location("toy_run", REPO / "examples" / "toy" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare(out: Path) -> tuple[Path, Path]:
    model, data = out / "init_model", out / "train.jsonl"
    if not (model / "config.json").is_file():
        toy = _toy_module()
        rows = toy.make_data(data)
        toy.warm_start(model, rows)
    return model, data


def train(run_dir: Path, model: Path, data: Path, steps: int, extra: list) -> tuple[list[float], float]:
    """(wall seconds between consecutive steps, CPU seconds of the whole run and its child processes)"""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(REPO / "examples/toy/config.yaml"),
           f"model.path={model}", f"data.path={data}", f"trainer.run_dir={run_dir}", f"trainer.num_steps={steps}",
           "rollout.deterministic=true", f"eval.path={data}", "eval.max_prompts=8", "eval.n_samples=2",
           "trainer.eval_interval=5", *extra]
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        sys.exit(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b["time"] - a["time"] for a, b in zip(rows, rows[1:])], cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="runs/bench_obs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data = prepare(out)
    variants = {"default": [],
                "all": ["trainer.loggers=[tensorboard,jsonl,wandb,mlflow]", "trainer.dump_rollouts=1"]}
    times, cpus = {k: [] for k in variants}, {k: [] for k in variants}
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(args.repeats):
        for name, extra in variants.items():
            dts, cpu = train(out / name, model, data, args.steps, extra)
            times[name] += dts[args.warmup:]
            cpus[name].append(cpu)
            print(f"repeat {r + 1} {name:8s}: median step {statistics.median(dts[args.warmup:]):.3f} s, "
                  f"whole run {cpu:.1f} CPU s", flush=True)
    base, full = statistics.median(times["default"]), statistics.median(times["all"])
    dump = sum(f.stat().st_size for f in (out / "all" / "rollouts").glob("*.gz")) / max(1, args.steps)
    print(f"\nmedian wall time per step over {len(times['default'])} steps each: default {base:.3f} s, "
          f"all loggers + dumps {full:.3f} s")
    print(f"ratio all/default: {full / base:.3f} ({(full / base - 1) * 100:+.1f}%)")
    c0, c1 = statistics.median(cpus["default"]), statistics.median(cpus["all"])
    print(f"CPU seconds per run (start-up included, median of {args.repeats}): default {c0:.1f}, all {c1:.1f}, "
          f"ratio {c1 / c0:.3f}; load average at end: {os.getloadavg()[0]:.1f}")
    print(f"rollout dump size: {dump / 1e3:.1f} kB per step (gzip)")
    work = background_work(out / "all", out / "components")
    print("background work per step (the writer threads' calls, timed alone in this process): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in work.items())
          + f"; total {sum(work.values()) / base * 100:.1f}% of the default step")


def background_work(run: Path, scratch: Path) -> dict:
    """Seconds per step of what the background threads do for the "all" run: each tracker's delivery (in batches of
    10 steps, as the thread delivers them at the toy's pace) and writing one step's dump."""
    import time

    from dapo_megatron.config import TrainerConfig
    from dapo_megatron.train.rollout_dump import RolloutDumper, read_dump
    from dapo_megatron.train.trackers import start_trackers

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    rows = [{k: v for k, v in json.loads(x).items() if k not in ("step", "time")}
            for x in (run / "metrics.jsonl").read_text().splitlines()]
    trackers = start_trackers(TrainerConfig(loggers=["jsonl", "wandb", "mlflow"]), scratch, {}, 0)
    steps = [(i + 1, rows[i % len(rows)]) for i in range(50)]
    out = {}
    for t in trackers.trackers:
        t0 = time.perf_counter()
        for i in range(0, len(steps), 10):
            t.log_steps(steps[i:i + 10])
        out[t.name] = (time.perf_counter() - t0) / len(steps)
    trackers.close()
    dumps = [read_dump(p) for p in sorted((run / "rollouts").glob("*.gz"))]
    t0 = time.perf_counter()
    for i, records in enumerate(dumps):
        RolloutDumper._write(scratch / f"d{i}.jsonl.gz", records)
    out["dump"] = (time.perf_counter() - t0) / max(1, len(dumps))
    return out


if __name__ == "__main__":
    main()
