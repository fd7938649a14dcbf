"""Asynchronous rollouts on a long-tailed workload: synchronous vs async_steps=1 vs async_steps=2 + partial rollouts.

    python tools/bench_async.py [--steps 20] [--warmup 1] [--prompts 16] [--group 8] [--modes sync,k1,k2p]
                                [--threads 1] [--seed 0]

Workload: the toy run (examples/toy: the `a+b=` prompts, its format-only warm-started tiny model, the embedded
engine, the real training loop), with long-tailed responses: every response of group g is exactly L(g) tokens, L
drawn from tools/bench_longtail.py's distribution (log-normal, median 128, clipped to 16..1024) seeded by the group
id, with EOS suppressed (SGLang's `ignore_eos`). The hook (`install_longtail`, in the worker process only) sets
`max_new_tokens` and `ignore_eos` on each group's request; the model samples every token, and every token goes
through the trainer's forward and backward with its log-prob. The reward is the toy's, read where the toy model
writes it: the first `Answer: d` of the response (`first_answer`). What the model samples after its first EOS only
fills L(g): the hook masks it out of the loss (`Sample.loss_mask` 0; it still costs its forward and backward), so
the toy's signal is what trains and the accuracy can rise. The same group ids reach every mode in the same order
(dynamic sampling off), so every mode trains on the same tokens per step.

Every mode runs with the trainer's old log-probs (actor.recompute_old_logprobs=true) and token TIS (threshold 2):
the decoupled-PPO setting async rollouts need, and the same trainer work in every mode. Modes:
  sync  rollout.async_steps=0
  k1    rollout.async_steps=1
  k2p   rollout.async_steps=2 rollout.partial_rollout=true
A mode whose settings the installed config refuses prints "not available" with the reason.

Per mode, over the measured steps (after --warmup): steps/s (from the metrics' timestamps), trained response tokens
per step, rollout/engine_busy_fraction (resident rows of the engine's running batch / engine_max_batch_size, time-
weighted over the step: rollout/engine_load.py) and engine_decode_occupancy (rows per decode step / max), and the
accuracy of each step (rollout/accuracy: first third of the steps -> last third).
"""
import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from bench_longtail import response_lengths  # noqa: E402

MODES = {"sync": ["rollout.async_steps=0"], "k1": ["rollout.async_steps=1"],
         "k2p": ["rollout.async_steps=2", "rollout.partial_rollout=true"]}
CONTEXT = 2048  # the toy model's positions, raised from 1024 so a 1,024-token response fits behind its prompt


def group_length(seed: int, group_id: int) -> int:
    return response_lengths(1, seed * 1_000_003 + group_id)[0]


def first_answer(response: str, ground_truth: str) -> bool:
    """The toy reward, at the first `Answer:` of the response (the toy model writes its answer first)."""
    import re

    m = re.search(r"Answer:\s*(\d)", response)  # one digit: the text after the first EOS follows it directly
    return bool(m) and m.group(1) == str(ground_truth).strip()


def install_longtail(seed: int, eos_ids: set) -> None:
    """Bench-only: each training group's request generates exactly group_length(seed, group_id) tokens; what
    follows a response's first EOS (or its first 16 tokens, without one) is masked out of the loss."""
    from dapo_megatron.rollout import client as rc
    from dapo_megatron.rollout.protocol import GenerationParams

    original = rc.RolloutClient.generate_group

    async def generate_group(self, samples, params):
        if samples and samples[0].group_id >= 0:  # eval groups (negative ids) keep their settings
            if isinstance(params, GenerationParams):
                params = rc.sglang_sampling_params(params)
            params = {**params, "max_new_tokens": group_length(seed, samples[0].group_id), "ignore_eos": True}
            await original(self, samples, params)
            for s in samples:
                n = len(s.response_ids)
                keep = next((i + 1 for i, t in enumerate(s.response_ids) if t in eos_ids), min(n, 16))
                s.loss_mask = [1] * keep + [0] * (n - keep)
            return samples
        return await original(self, samples, params)

    rc.RolloutClient.generate_group = generate_group


def worker(argv: list, seed: int) -> None:
    from transformers import AutoTokenizer

    model = next(x.split("=", 1)[1] for x in argv if x.startswith("model.path="))
    install_longtail(seed, {AutoTokenizer.from_pretrained(model).eos_token_id})
    from dapo_megatron.cli import main

    main(argv)


# ---- setup ---------------------------------------------------------------------------------------------------
def make_toy(work: Path) -> tuple[Path, Path]:
    """The toy's data and warm-started model (examples/toy/run.py), its context raised to CONTEXT positions."""
    spec = importlib.util.spec_from_file_location("toy_run", bc.REPO / "examples" / "toy" / "run.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    data, model = work / "train.jsonl", work / "init_model"
    if not (model / "config.json").is_file():
        rows = toy.make_data(data)
        toy.warm_start(model, rows)
        cfg = json.loads((model / "config.json").read_text())
        cfg["max_position_embeddings"] = CONTEXT  # RoPE: any length; the warm start saw 10 tokens anyway
        (model / "config.json").write_text(json.dumps(cfg, indent=1))
    return data, model


def overrides(a, data: Path, model: Path, run_dir: Path, mode: str) -> list:
    n = a.prompts * a.group
    return [f"model.path={model}", f"data.path={data}", f"trainer.run_dir={run_dir}",
            f"trainer.save={run_dir / 'ckpt'}", f"trainer.num_steps={a.warmup + a.steps}", "trainer.save_interval=0",
            "trainer.tensorboard=false", f"trainer.seed={a.seed}", f"data.seed={a.seed}",
            f"rollout.rollout_batch_size={a.prompts}", f"rollout.n_samples_per_prompt={a.group}",
            "rollout.max_response_length=1024", f"rollout.engine_max_batch_size={a.engine_max_batch_size}",
            "dynamic_sampling.enable=false", "reward.type=python:bench_async.first_answer", "reward.num_workers=0",
            f"actor.global_batch_size={n}", f"actor.micro_batch_size={min(n, 32)}",
            "actor.max_tokens_per_microbatch=8192", "actor.recompute_old_logprobs=true",
            "algorithm.rollout_correction.level=token", "algorithm.rollout_correction.mode=truncate",
            "algorithm.rollout_correction.threshold=2.0", *MODES[mode]]


def refusal(config: Path, args: list):
    """None if the installed config accepts `args`, else its one-line reason."""
    from dapo_megatron.config import build_config, validate

    try:
        validate(build_config(str(config), args), 1)
    except Exception as e:  # ConfigError, or a dataclass refusing an unknown key
        line = str(e).splitlines()[0]
        return line if len(line) <= 120 else line[:117] + "..."
    return None


def run_mode(a, work: Path, data: Path, model: Path, mode: str) -> dict:
    run_dir = bc.fresh_dir(work / mode)
    config = bc.REPO / "examples" / "toy" / "config.yaml"
    args = overrides(a, data, model, run_dir, mode)
    why = refusal(config, args)
    if why:
        return {"name": mode, "available": False, "why": why}
    cmd = [sys.executable, __file__, "--worker", "--seed", str(a.seed), "--", "train", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join([str(bc.REPO / "tools"), str(bc.REPO), os.environ.get("PYTHONPATH", "")])}
    rc, wall, peak = bc.run_measured(cmd, env, run_dir / "log.txt", a.timeout)
    if rc:
        sys.exit(f"{mode} failed with exit code {rc}; see {run_dir / 'log.txt'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = rows[a.warmup:]
    span = measured[-1]["time"] - rows[a.warmup - 1]["time"]
    acc = [r.get("rollout/accuracy", float("nan")) for r in rows]
    third = max(1, len(acc) // 3)

    def mean(key):
        xs = [r[key] for r in measured if key in r]
        return sum(xs) / len(xs) if xs else float("nan")

    return {"name": mode, "available": True, "steps_per_s": len(measured) / span,
            "trained_tokens": bc.median([r["rollout/response_length_mean"] * r.get("rollout/groups_kept", a.prompts)
                                         * a.group for r in measured]),
            "busy": mean("rollout/engine_busy_fraction"), "occupancy": mean("rollout/engine_decode_occupancy"),
            "lag_max": max(r.get("rollout/weight_version_lag_max", 0) for r in measured),
            "acc_first": sum(acc[:third]) / third, "acc_last": sum(acc[-third:]) / third, "accuracy": acc,
            "wall_s": wall, **peak}


def print_table(results: list) -> None:
    print(f"\n{'mode':6}{'steps/s':>9}{'x sync':>8}{'trained tok/step':>18}{'busy frac':>11}{'decode occ':>12}"
          f"{'lag max':>9}{'accuracy first->last third':>29}")
    base = next((r["steps_per_s"] for r in results if r["name"] == "sync" and r["available"]), None)
    for r in results:
        if not r["available"]:
            print(f"{r['name']:6}  not available: {r['why']}")
            continue
        ratio = f"{r['steps_per_s'] / base:7.2f}x" if base else f"{'-':>8}"
        print(f"{r['name']:6}{r['steps_per_s']:9.4f}{ratio}{r['trained_tokens']:18.0f}{r['busy']:11.3f}"
              f"{r['occupancy']:12.3f}{int(r['lag_max']):9d}{r['acc_first']:16.3f} -> {r['acc_last']:.3f}")
    for r in results:
        if r["available"]:
            print(f"accuracy per step, {r['name']}: " + " ".join(f"{x:.2f}" for x in r["accuracy"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of steps/s (>= 1)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--engine-max-batch-size", type=int, help="the engine's slots (default: prompts x group, one "
                   "step's responses)")
    p.add_argument("--modes", default="sync,k1,k2p")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--work", default=str(bc.REPO / "runs" / "bench_async"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.worker:
        return worker(rest[1:] if rest[:1] == ["--"] else rest, a.seed)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (steps/s is timed from the end of the last warm-up step)")
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; use {','.join(MODES)}")
    a.engine_max_batch_size = a.engine_max_batch_size or a.prompts * a.group
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data, model = make_toy(work)
    lengths = [group_length(a.seed, g) for g in range(a.prompts * (a.warmup + a.steps))]
    print(f"bench_async: {' '.join(sys.argv[1:])}\nmachine: {bc.machine_line()}\nper-group response lengths: "
          f"min {min(lengths)}, median {sorted(lengths)[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)} ({a.prompts} groups x {a.group} responses per step)", flush=True)
    results = []
    for mode in modes:
        results.append(run_mode(a, work, data, model, mode))
        r = results[-1]
        print(f"{mode}: " + (f"done in {r['wall_s']:.0f} s" if r["available"] else "not available"), flush=True)
    print_table(results)
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
