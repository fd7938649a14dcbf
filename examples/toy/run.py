"""The README's main job: DAPO on CPU, a tiny model learns `a+b=` (single digits) with an `Answer:` line.

Steps, all in this one command:
1. data: every `a+b=` with a, b in 0..4 (25 prompts), answers 0..8;
2. a random-init Qwen2.5-shaped model (toy character tokenizer);
3. warm start (honest, and said here): 60 steps of supervised training on the *format* only, "Answer: <d>" with a
   digit d drawn at random, never the sum, so accuracy starts near chance (1 in 9);
4. DAPO: `dapo-megatron train --config examples/toy/config.yaml`, the real loop (embedded engine, rule reward,
   dynamic sampling, token-level Clip-Higher loss on megatron-core); the accuracy curve is printed at the end.
Extra arguments are passed to the trainer as overrides (e.g. parallel.tensor_model_parallel_size=2).
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import torch

RUN = Path("runs/toy")


def make_data(path: Path) -> list[dict]:
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def warm_start(model_dir: Path, rows: list[dict], steps: int = 80, seed: int = 0) -> None:
    """Format-only SFT. Each prompt gets a fixed *wrong* digit, used as the target half of the time (a uniform random
    digit otherwise): the model learns the `Answer: d` format and to tell prompts apart, never a correct sum."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_megatron.models.tiny import make_tiny_hf_model, sft_step

    make_tiny_hf_model(model_dir, "qwen2.5", seed=seed, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    decoy = {r["question"]: rng.choice([d for d in range(9) if str(d) != r["answer"]]) for r in rows}
    for step in range(steps):
        batch = rng.sample(rows, 16)
        prompts = [r["question"] for r in batch]  # config.yaml: data.apply_chat_template=false
        digits = [decoy[p] if rng.random() < 0.5 else rng.randrange(9) for p in prompts]
        texts = [p + f"Answer: {d}<|im_end|>" for p, d in zip(prompts, digits)]
        loss = sft_step(model, tok, opt, prompts, texts)
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"warm start: {steps} format-only SFT steps (no correct sums shown), final loss {loss.item():.3f}",
          flush=True)


def print_curve(metrics_file: Path) -> None:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    print("\nstep  accuracy  reward   (all generated responses, before filtering)")
    every = max(1, len(rows) // 30)
    for r in rows[every - 1::every]:
        acc = r.get("rollout/accuracy", float("nan"))
        print(f"{r['step']:4d}  {acc:8.3f}  {r.get('rollout/reward_mean', float('nan')):6.3f}  " + "#" * int(40 * acc))
    first = sum(r.get("rollout/accuracy", 0) for r in rows[:3]) / max(len(rows[:3]), 1)
    last = sum(r.get("rollout/accuracy", 0) for r in rows[-3:]) / max(len(rows[-3:]), 1)
    print(f"\naccuracy: first 3 steps {first:.3f} -> last 3 steps {last:.3f}")


def run_folder(argv) -> Path:
    """`trainer.run_dir` if given, else runs/toy, or runs/toy-2, -3, ... when an earlier demo left its checkpoints
    there: a second `make demo` starts a fresh run beside the first instead of being refused (nothing is deleted)."""
    for arg in argv:
        if arg.startswith("trainer.run_dir="):
            return Path(arg.split("=", 1)[1])
    run, n = RUN, 1
    while (run / "checkpoints").exists():
        n += 1
        run = RUN.with_name(f"{RUN.name}-{n}")
    return run


def main(argv):
    run = run_folder(argv)
    run.mkdir(parents=True, exist_ok=True)
    rows = make_data(run / "train.jsonl")
    warm_start(run / "init_model", rows)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    folders = [f"model.path={run / 'init_model'}", f"data.path={run / 'train.jsonl'}", f"trainer.run_dir={run}"]
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", "examples/toy/config.yaml", *folders, *argv]
    rc = subprocess.call(cmd)
    if rc:
        sys.exit(rc)
    print_curve(run / "metrics.jsonl")
    print(f"TensorBoard logs: {run / 'tensorboard'}  (tensorboard --logdir {run})")


if __name__ == "__main__":
    main(sys.argv[1:])
