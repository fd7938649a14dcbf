"""DAPO's Table 1 at CPU scale: the six cumulative configurations of examples/ablation/configs.yaml, several seeds
each, the same generated-token budget for every run; writes a markdown table and plots to docs/ablation/.

    python tools/ablation.py                                  # 6 configurations x 5 seeds (about 30 min, 2 cores)
    python tools/ablation.py --configs naive_grpo,dynamic_sampling --seeds 1 --budget-tokens 3000   # smoke

The task: `qz|3+4=` -> `Answer: 7`, the 25 sums a+b with a, b in 3..7, so the answers 6..14 have one digit or two.
Every answer is equally common: each sum gets 24 training prompts and 8 held-out prompts, spread over its pairs
(6 = 3+3 comes 24 times, 10 = 3+7 = 4+6 = ... about 5 times each), each behind a random two-letter prefix. So the
best constant answer scores 1/9 = 0.111 on both splits, and no answer is a shortcut (the former 0..4 task had "4"
right for 5 of 25 prompts and every run collapsed onto it). The held-out split (72 prompts) is never trained on: its
prefixes come from a pool that no training prompt uses (the same sums behind unseen strings; a 2-layer model this small
does not generalise to unseen sums, so the split measures what transfers beyond the trained strings). Difficulty is
mixed: a sum with one pair is seen 24 times, a pair of a five-pair sum about 5 times, and the warm start's decoys
differ per prompt, so many groups come back all-wrong early and all-right late.

Warm start (disclosed; per seed, as `make demo` does): a random-init Qwen2.5-shaped model (2 layers, hidden 128, the
toy character tokenizer) gets 80 steps (--warm-steps) of supervised training on the *format* only: the prompt, 0-10
filler dots, then `Answer: d` with d one of the nine answers but never the right one (a fixed decoy per prompt half of
the time). It never sees a correct answer, so every correct answer is found by RL, and the correct answer starts below
chance (0.03-0.10 of the first rollouts against 1/9: the Clip-Higher regime). `Answer: 7` is 3 tokens and
`Answer: 12` 4, so with 0-10 dots 36-50% of the first responses overrun rollout.max_response_length=8 and the
overlong techniques have something to change; the length limit binds harder for the two-digit answers.

Budget: every run stops at the step whose generated response tokens (all generated groups, kept or filtered) reach
--budget-tokens (trainer.max_generated_tokens), so dynamic sampling pays for its extra generation.
Reported per configuration, mean +- std over seeds: final held-out avg@4 (eval at the last step), steps to reach
--target on the training rollouts' accuracy (5-step moving mean), final entropy, mean response length and
truncated fraction (means over the last 5 steps), and the truncated fraction over the whole run.
"""
import argparse
import concurrent.futures
import json
import os
import random
import shlex
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "examples" / "ablation"
FILLER_MAX = 10
OPERANDS = range(3, 8)
ANSWERS = range(6, 15)  # a + b for a, b in OPERANDS: one digit or two, each equally common in both splits
TAIL = 5  # steps averaged for the "final" columns


# ---- the task ----------------------------------------------------------------------------------------------------
def make_task(work: Path, per_answer: int = 24, heldout_per_answer: int = 8, seed: int = 0) -> None:
    """train.jsonl and heldout.jsonl: the sums a+b (a, b in 3..7), `per_answer` prompts per sum (its pairs in turn,
    each behind a random two-letter prefix: `qz|3+4=`), so every answer is equally common; the held-out prompts draw
    their prefixes from a pool that no training prompt uses. Same files for every run."""
    rng = random.Random(seed)
    prefixes = [x + y for x in string.ascii_lowercase for y in string.ascii_lowercase]
    rng.shuffle(prefixes)
    pools = {"train": prefixes[:len(prefixes) // 2], "heldout": prefixes[len(prefixes) // 2:]}
    for name, count in (("train", per_answer), ("heldout", heldout_per_answer)):
        items = []
        for total in ANSWERS:
            pairs = [(a, total - a) for a in OPERANDS if total - a in OPERANDS]
            for i, prefix in enumerate(rng.sample(pools[name], count)):  # distinct prefixes: distinct prompts
                a, b = pairs[i % len(pairs)]
                items.append({"question": f"{prefix}|{a}+{b}=", "answer": str(total)})
        rng.shuffle(items)
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def warm_start(model_dir: Path, train_file: Path, seed: int, steps: int = 80) -> float:
    """Format-only SFT (module docstring): filler, then `Answer: d` with d never the right sum. Each prompt has a
    fixed wrong decoy, the target half of the time (another wrong answer otherwise), so the model learns the format
    and to tell prompts apart, and starts below chance on the right answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_megatron.models.tiny import make_tiny_hf_model, sft_step

    torch.manual_seed(seed)
    make_tiny_hf_model(model_dir, "qwen2.5", seed=seed, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    rng = random.Random(seed)
    wrong = {r["question"]: [d for d in ANSWERS if str(d) != r["answer"]] for r in rows}
    decoy = {q: rng.choice(ds) for q, ds in wrong.items()}
    for _ in range(steps):
        batch = rng.sample(rows, 16)
        prompts = [r["question"] for r in batch]
        digits = [decoy[p] if rng.random() < 0.5 else rng.choice(wrong[p]) for p in prompts]
        texts = [p + "." * rng.randint(0, FILLER_MAX) + f"Answer: {d}<|im_end|>" for p, d in zip(prompts, digits)]
        loss = sft_step(model, tok, opt, prompts, texts)
    model.save_pretrained(model_dir, safe_serialization=True)
    return float(loss.detach())


# ---- running -----------------------------------------------------------------------------------------------------
def load_configs() -> dict:
    """name -> cumulative dotted overrides (each configuration adds its switches to all above it)."""
    import yaml

    raw = yaml.safe_load((CONFIG_DIR / "configs.yaml").read_text())
    out, acc = {}, {}
    for name, switches in raw.items():
        acc = {**acc, **switches}
        out[name] = dict(acc)
    return out


def base_budget() -> int:
    """The budget examples/ablation/base.yaml states (trainer.max_generated_tokens): --budget-tokens' default."""
    import yaml

    return int(yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())["trainer"]["max_generated_tokens"])


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def run_one(a, work: Path, name: str, overrides: dict, seed: int) -> dict:
    seed_dir = work / f"seed{seed}"
    run_dir = work / "runs" / f"{name}_seed{seed}"
    base = (CONFIG_DIR / "base.yaml").read_text().replace("WORK", str(seed_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "base.yaml").write_text(base)
    args = [f"{k}={_value(v)}" for k, v in overrides.items()] + [
        f"trainer.run_dir={run_dir}", f"trainer.save={run_dir / 'checkpoints'}", f"trainer.seed={seed}",
        f"data.seed={seed}", f"trainer.max_generated_tokens={a.budget_tokens}", *a.override]
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(run_dir / "base.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=a.timeout)
    if rc:
        sys.exit(f"{name} seed {seed} failed (exit {rc}); see {run_dir / 'log.txt'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "seed": seed, "rows": rows, "wall_s": time.perf_counter() - t0,
            "command": shlex.join(["dapo-megatron", "train", "--config", "examples/ablation/base.yaml",
                                   *args[:len(overrides)]])}


# ---- summary -----------------------------------------------------------------------------------------------------
def _moving(xs, k=5):
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def summarize_run(run: dict, target: float) -> dict:
    rows = run["rows"]
    acc = [r["rollout/accuracy"] for r in rows]
    evals = [r for r in rows if "eval/avg@4" in r]
    reached = next((i + 1 for i, v in enumerate(_moving(acc)) if v >= target), None)
    tail = rows[-TAIL:]
    return {"heldout": evals[-1]["eval/avg@4"] if evals else float("nan"), "steps": len(rows),
            "steps_to_target": reached,
            "tokens_to_target": rows[reached - 1]["rollout/generated_tokens_total"] if reached else None,
            "truncated_run": statistics.fmean(r["rollout/truncation_rate"] for r in rows),
            "entropy": statistics.fmean(r["actor/entropy"] for r in tail if "actor/entropy" in r),
            "length": statistics.fmean(r["rollout/response_length_mean"] for r in tail),
            "truncated": statistics.fmean(r["rollout/truncation_rate"] for r in tail),
            "train_acc": statistics.fmean(acc[-TAIL:]),
            "tokens": rows[-1]["rollout/generated_tokens_total"]}


def _ms(values, fmt="{:.3f}") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "never"
    text = fmt.format(statistics.fmean(vals))
    if len(vals) > 1:
        text += " ± " + fmt.format(statistics.stdev(vals))
    missing = len(values) - len(vals)
    return text + (f" ({missing} never)" if missing else "")


def claims(summary: dict) -> list[str]:
    """The paper's claims, checked against our means (the note beside each is written by hand in README.md)."""
    names = list(summary)
    mean = {n: {k: statistics.fmean([s[k] for s in summary[n] if s[k] is not None] or [float("nan")])
                for k in ("heldout", "entropy", "truncated", "truncated_run", "train_acc")} for n in names}
    lines = []
    order = sorted(names, key=lambda n: mean[n]["heldout"])
    lines.append(f"- Ordering of final held-out accuracy (low to high): {' < '.join(order)}; the paper's order is "
                 f"{' < '.join(names)}: {'agrees' if order == names else 'disagrees'}.")
    if "clip_higher" in mean and "overlong_filtering" in mean:
        hi, lo = mean["clip_higher"]["entropy"], mean["overlong_filtering"]["entropy"]
        lines.append(f"- Entropy with Clip-Higher {hi:.3f} vs without {lo:.3f} (final, the configurations either side "
                     f"of the switch): {'agrees' if hi > lo else 'disagrees'}.")
    if "dynamic_sampling" in summary and "token_level_loss" in summary:
        # Seeds that never reach the target are counted as such, not given a step count: under a token budget
        # dynamic sampling runs fewer steps, so "length + 1" would favour it for failing early.
        def reach(n):
            got = [s for s in summary[n] if s["steps_to_target"] is not None]
            steps = statistics.fmean(s["steps_to_target"] for s in got) if got else float("nan")
            tokens = statistics.fmean(s["tokens_to_target"] for s in got) if got else float("nan")
            return len(got), steps, tokens, f"{len(got)}/{len(summary[n])} seeds" + (
                f", in {steps:.1f} steps ({tokens:,.0f} tokens)" if got else "")
        (kd, sd, _, td), (kn, sn, _, tn) = reach("dynamic_sampling"), reach("token_level_loss")
        agrees = kd > kn or (kd == kn > 0 and sd < sn)
        lines.append(f"- Reaching the target with dynamic sampling: {td}; without: {tn}: "
                     f"{'agrees' if agrees else 'disagrees'}.")
    if "naive_grpo" in mean and "soft_overlong_punishment" in mean:
        t0, t1 = mean["naive_grpo"]["truncated"], mean["soft_overlong_punishment"]["truncated"]
        r0, r1 = mean["naive_grpo"]["truncated_run"], mean["soft_overlong_punishment"]["truncated_run"]
        lines.append(f"- Truncated fraction, naive GRPO {t0:.3f} vs with both overlong techniques {t1:.3f} (final; "
                     f"whole run {r0:.3f} vs {r1:.3f}): {'agrees' if t1 < t0 else 'disagrees'}"
                     f"{'' if t1 < t0 else (' at the end; whole run ' + ('agrees' if r1 < r0 else 'disagrees'))}.")
    return lines


def write_table(a, out: Path, summary: dict, runs: list, elapsed: float, cpu_s: float) -> Path:
    lines = ["# DAPO ablation at CPU scale", "",
             f"Made by `python tools/ablation.py {' '.join(a.argv)}`".rstrip() + f" in {elapsed / 60:.1f} min wall "
             f"({cpu_s / 60:.1f} CPU-minutes of the trainer processes) on {os.cpu_count()} cores.",
             f"{len(next(iter(summary.values())))} seeds per configuration; every run stops at "
             f"{a.budget_tokens:,} generated response tokens. Target: a 5-step moving mean of training-rollout "
             f"accuracy >= {a.target} (the best constant answer scores {1 / len(ANSWERS):.3f}). Final columns: "
             f"the last {TAIL} steps.", "",
             "| configuration | held-out avg@4 | steps to target | tokens to target | steps run | final entropy "
             "| mean response length | truncated fraction | truncated, whole run | train accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, items in summary.items():
        lines.append(f"| {name} | {_ms([s['heldout'] for s in items])} | "
                     f"{_ms([s['steps_to_target'] for s in items], '{:.1f}')} | "
                     f"{_ms([s['tokens_to_target'] for s in items], '{:,.0f}')} | "
                     f"{_ms([s['steps'] for s in items], '{:.0f}')} | {_ms([s['entropy'] for s in items])} | "
                     f"{_ms([s['length'] for s in items], '{:.2f}')} | {_ms([s['truncated'] for s in items])} | "
                     f"{_ms([s['truncated_run'] for s in items])} | {_ms([s['train_acc'] for s in items])} |")
    lines += ["", "Claims of the paper, checked by the tool:", "", *claims(summary), "",
              "One run's command (per seed the tool adds trainer.seed, data.seed, the folders and the budget):", ""]
    lines += [f"- `{r['command']}`" for r in runs if r["seed"] == runs[0]["seed"]]
    path = out / "table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(out: Path, runs: list, names: list) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, fname in (("rollout/accuracy", "training-rollout accuracy", "accuracy.png"),
                              ("eval/avg@4", "held-out avg@4", "heldout.png"),
                              ("actor/entropy", "entropy", "entropy.png"),
                              ("rollout/response_length_mean", "mean response length (tokens)", "length.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name in names:
            series = [{r["step"]: r[key] for r in run["rows"] if key in r} for run in runs if run["name"] == name]
            steps = sorted(set().union(*series))
            mean, lo, hi, xs = [], [], [], []
            for s in steps:
                vals = [d[s] for d in series if s in d]
                if len(vals) < len(series):  # seeds stop at different steps: plot where all have data
                    continue
                m, sd = statistics.fmean(vals), statistics.pstdev(vals)
                xs.append(s), mean.append(m), lo.append(m - sd), hi.append(m + sd)
            line, = ax.plot(xs, mean, label=name, marker="o" if key.startswith("eval") else None, markersize=3)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("step"), ax.set_ylabel(label), ax.grid(alpha=0.3), ax.legend(fontsize=7)
        ax.set_title(f"{label} (mean ± std over seeds)")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all", help="comma-separated names from examples/ablation/configs.yaml")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget-tokens", type=int, default=base_budget(),
                   help="generated response tokens per run (default: base.yaml's trainer.max_generated_tokens)")
    p.add_argument("--target", type=float, default=0.25, help="training-rollout accuracy for 'steps to target'")
    p.add_argument("--warm-steps", type=int, default=80, help="supervised steps of the format-only warm start")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    p.add_argument("--work", default="/tmp/dapo_ablation")
    p.add_argument("--out", default=str(REPO / "docs" / "ablation"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--override", action="append", default=[], help="extra trainer override for every run")
    a = p.parse_args(argv)
    a.argv = argv
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True), out.mkdir(parents=True, exist_ok=True)
    configs = load_configs()
    names = list(configs) if a.configs == "all" else a.configs.split(",")
    unknown = [n for n in names if n not in configs]
    if unknown:
        sys.exit(f"--configs: unknown {unknown}; choose from {list(configs)}")
    t0 = time.perf_counter()
    for seed in range(a.seeds):
        seed_dir = work / f"seed{seed}"
        seed_dir.mkdir(exist_ok=True)
        make_task(seed_dir)
        loss = warm_start(seed_dir / "init_model", seed_dir / "train.jsonl", seed, steps=a.warm_steps)
        print(f"seed {seed}: format-only warm start, final SFT loss {loss:.3f}", flush=True)
    jobs = [(n, s) for s in range(a.seeds) for n in names]
    before = os.times()
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        futures = {pool.submit(run_one, a, work, n, configs[n], s): (n, s) for n, s in jobs}
        runs = []
        for f in concurrent.futures.as_completed(futures):
            r = f.result()
            runs.append(r)
            print(f"{r['name']} seed {r['seed']}: {len(r['rows'])} steps in {r['wall_s']:.0f} s", flush=True)
    after = os.times()
    cpu_s = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    runs.sort(key=lambda r: (r["seed"], names.index(r["name"])))
    summary = {n: [summarize_run(r, a.target) for r in runs if r["name"] == n] for n in names}
    table = write_table(a, out, summary, runs, time.perf_counter() - t0, cpu_s)
    plots = plot(out, runs, names)
    keep = ("step", "rollout/accuracy", "eval/avg@4", "actor/entropy", "rollout/response_length_mean",
            "rollout/truncation_rate", "rollout/generated_tokens_total", "rollout/groups_kept")
    (out / "runs.json").write_text(json.dumps([{**{k: v for k, v in r.items() if k != "rows"},
                                                "rows": [{k: x[k] for k in keep if k in x} for x in r["rows"]]}
                                               for r in runs]))
    print(table.read_text())
    print("plots: " + ", ".join(str(x) for x in plots))
    return summary


if __name__ == "__main__":
    main()
