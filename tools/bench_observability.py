"""Overhead of watching a run: the toy DAPO run (examples/toy) with every logger and rollout dumps on, against the
default (tensorboard + jsonl), side by side in one invocation.

    python tools/bench_observability.py [--steps 20] [--warmup 3] [--repeats 3] [--out runs/bench_obs]

Both variants train the same warm-started toy model on the same data with examples/toy/config.yaml (rollout.deterministic
on). "all" adds trainer.loggers=[tensorboard,jsonl,wandb,mlflow] (W&B offline, MLflow's local SQLite store),
trainer.dump_rollouts=1 (every step dumped) and an eval every 5 steps on both variants (so eval dumps are written too).
Step time is the wall time between consecutive metrics.jsonl records (it covers logging and the dump hand-off, which
the loop's time/step_s does not), median over the steps after --warmup; the runs alternate default/all, all/default
(ABBA) --repeats times to spread machine drift. CPU time per step is that of the trainer and every process under it
(the trackers' process, wandb-core, reward workers) over the same steps, read from /proc: it is what the overhead
costs in cores, and it moves less than wall time on a shared machine. Prints both ratios all/default, pooled and per
repeat; the last "all" run is left in --out for `dapo-megatron report`.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
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


def _tree_cpu(root: int) -> dict:
    """{pid: CPU seconds} of `root` and its descendants (the trackers' process, wandb-core, reward workers)."""
    tck, parent, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            parent[int(p)], cpu[int(p)] = int(f[1]), (int(f[11]) + int(f[12])) / tck
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in cpu:
            tree[pid] = cpu[pid]
            todo += [c for c, pp in parent.items() if pp == pid]
    return tree


def train(run_dir: Path, model: Path, data: Path, steps: int, warmup: int, extra: list) -> tuple[list[float], float]:
    """(wall seconds between consecutive steps, CPU seconds per step after `warmup` of the trainer and every process
    under it, sampled from /proc every 0.2 s)"""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(REPO / "examples/toy/config.yaml"),
           f"model.path={model}", f"data.path={data}", f"trainer.run_dir={run_dir}", f"trainer.num_steps={steps}",
           "rollout.deterministic=true", f"eval.path={data}", "eval.max_prompts=8", "eval.n_samples=2",
           "trainer.eval_interval=5", *extra]
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    log = run_dir.with_name(run_dir.name + ".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        samples = []  # (time, {pid: CPU s}); a pid keeps its last value after it exits
        seen: dict = {}
        while proc.poll() is None:
            seen.update(_tree_cpu(proc.pid))
            samples.append((time.time(), dict(seen)))
            time.sleep(0.2)
    if proc.returncode != 0:
        sys.exit(f"train failed ({proc.returncode}), see {log}:\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def cpu_at(t):
        return sum(min(samples, key=lambda s: abs(s[0] - t))[1].values())

    t0, t1 = rows[warmup - 1]["time"], rows[-1]["time"]
    cpu = (cpu_at(t1) - cpu_at(t0)) / (len(rows) - warmup)
    return [b["time"] - a["time"] for a, b in zip(rows, rows[1:])], cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench_obs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data = prepare(out)
    variants = {"default": [],
                "all": ["trainer.loggers=[tensorboard,jsonl,wandb,mlflow]", "trainer.dump_rollouts=1"]}
    runs, cpus, ratios = {k: [] for k in variants}, {k: [] for k in variants}, []
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(args.repeats):
        medians = {}
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):  # ABBA: drift cancels
            dts, cpu = train(out / name, model, data, args.steps, args.warmup, variants[name])
            runs[name].append(dts[args.warmup:])
            cpus[name].append(cpu)
            medians[name] = statistics.median(dts[args.warmup:])
            print(f"repeat {r + 1} {name:8s}: median step {medians[name]:.3f} s, {cpu:.3f} CPU s per step "
                  "(trainer + its processes)", flush=True)
        ratios.append(medians["all"] / medians["default"])
    base, full = (statistics.median([x for run in runs[k] for x in run]) for k in ("default", "all"))
    # a step's work is the same in every run and variant (rollout.deterministic: same samples, same metrics), and a
    # busy machine only adds time: the fastest of the repeats of each step is the least disturbed measure
    fast0, fast1 = (sum(min(col) for col in zip(*runs[k])) for k in ("default", "all"))
    c0, c1 = statistics.median(cpus["default"]), statistics.median(cpus["all"])
    dump = sum(f.stat().st_size for f in (out / "all" / "rollouts").glob("*.gz")) / max(1, args.steps)
    print(f"\nsteps {args.warmup + 1}-{args.steps} of {args.repeats} runs each (load average at end: "
          f"{os.getloadavg()[0]:.1f})")
    print(f"wall time per step, median: default {base:.3f} s, all loggers + dumps {full:.3f} s, ratio "
          f"{full / base:.3f} ({(full / base - 1) * 100:+.1f}%); per repeat "
          + ", ".join(f"{x:.3f}" for x in ratios) + f" (median {statistics.median(ratios):.3f})")
    print(f"wall time of steps {args.warmup + 1}-{args.steps}, each the fastest of its {args.repeats} repeats: default "
          f"{fast0:.2f} s, all {fast1:.2f} s, ratio {fast1 / fast0:.3f} ({(fast1 / fast0 - 1) * 100:+.1f}%)")
    print(f"CPU time per step (trainer + its processes), median of runs: default {c0:.3f} s, all {c1:.3f} s, ratio "
          f"{c1 / c0:.3f} ({(c1 / c0 - 1) * 100:+.1f}%)")
    print(f"rollout dump size: {dump / 1e3:.1f} kB per step (gzip)")
    work = background_work(out / "all", out / "components")
    print("work off the training thread per step, timed alone in this process: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in work.items())
          + f"; total {sum(work.values()) / base * 100:.1f}% of the default step (the trackers' in their own process)")


def background_work(run: Path, scratch: Path) -> dict:
    """Seconds per step of what runs off the training thread for the "all" run: each tracker's delivery (in batches
    of 10 steps; in the trackers' process) and writing one step's dump (the dump thread)."""
    from dapo_megatron.config import TrainerConfig
    from dapo_megatron.train.rollout_dump import RolloutDumper, read_dump
    from dapo_megatron.train.trackers import open_trackers

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    rows = [{k: v for k, v in json.loads(x).items() if k not in ("step", "time")}
            for x in (run / "metrics.jsonl").read_text().splitlines()]
    cfg = TrainerConfig(loggers=["jsonl", "wandb", "mlflow"])
    trackers = open_trackers(["wandb", "mlflow"], {"wandb": cfg.wandb, "mlflow": cfg.mlflow}, scratch, {}, 0)
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
