"""DAPO with a tool, on CPU: a tiny model learns to answer `47*3=` by calling the calculator (rollout.multi_turn).

Steps, all in this one command (examples/toy/run.py is the single-turn twin; its helpers are imported):
1. data: every `a*b=` with a in 10..99, b in 2..9 (720 prompts, products 20..891), far more than a tiny model can
   learn by heart in a few minutes;
2. a random-init Qwen2.5-shaped model (toy character tokenizer);
3. warm start (disclosed): supervised steps on the *call format* only. The target of `47*3=` is
       ```calculator\\n<a'*b'>\\n```\\n   [tool: ```output ... ```]   Answer: <the tool's output><|im_end|>
   where a'*b' is the prompt's expression with each digit kept or changed at random, at least one always changed, and
   never a product equal to the right one: every call shown is wrong, so every result and answer shown is wrong. The
   tool result is the ids the rollout appends (same renderer and tokenizer) and is masked out of the loss, as in RL;
4. DAPO: `dapo-megatron train --config examples/tools_toy/config.yaml`, the real loop with the calculator tool
   (fenced calls, embedded engine, math_dapo reward, dynamic sampling); the accuracy curve is printed at the end.
Extra arguments are trainer overrides: `rollout.multi_turn.enabled=false` is the same run without the tool (the model
then writes the "output" itself and must multiply in its head). `--warm-steps N` sets the warm start's length.
"""
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

TOY = Path(__file__).resolve().parents[1] / "toy" / "run.py"
_spec = importlib.util.spec_from_file_location("toy_run", TOY)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)
toy.RUN = Path("runs/tools_toy")  # toy.run_folder's default: runs/tools_toy, then -2, -3, ... beside earlier runs

CONFIG = Path(__file__).resolve().parent / "config.yaml"


def make_data(path: Path) -> list[dict]:
    rows = [{"question": f"{a}*{b}=", "answer": str(a * b)} for a in range(10, 100) for b in range(2, 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def wrong_call(a: int, b: int, rng: random.Random, keep: float = 0.9) -> tuple[int, int]:
    """The prompt's digits, each kept with probability `keep` or changed to another digit; at least one changed, and
    the product never the right one (12*4 and 16*3 are both 48: such a call is drawn again)."""
    digits = f"{a}{b}"
    while True:
        out = [d if rng.random() < keep else rng.choice([c for c in "0123456789" if c != d]) for d in digits]
        if out[0] == "0" or out[2] in "01":
            continue  # keep the prompt's shape: a two-digit a (07 is not a number to the calculator), b in 2..9
        a2, b2 = int("".join(out[:2])), int(out[2])
        if a2 * b2 != a * b:
            return a2, b2


def warm_start(model_dir: Path, rows: list[dict], steps: int = 600, seed: int = 0, batch: int = 32) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_megatron.models.tiny import make_tiny_hf_model, toy_tokenizer
    from dapo_megatron.rollout.multi_turn import ToolMessageRenderer

    make_tiny_hf_model(model_dir, "qwen2.5", seed=seed, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    # The trainer reads the model folder's tokenizer (prompts, tool results). Loaded from a qwen2 folder, transformers
    # builds a Qwen2Tokenizer that drops spaces and newlines when it *encodes* (so the tool result is "```output141```"
    # at rollout too); the model's own turns need their newlines (the call ends at the stop string "\n```\n"), so they
    # are encoded with the toy tokenizer itself, which keeps them. Both share one vocabulary.
    tok_run, tok_text = AutoTokenizer.from_pretrained(model_dir), toy_tokenizer()
    renderer = ToolMessageRenderer(tok_run, "fenced")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)

    def example(row):
        a, b = map(int, row["question"][:-1].split("*"))
        a2, b2 = wrong_call(a, b, rng)
        out = str(a2 * b2)
        prompt = tok_run(row["question"]).input_ids
        call = tok_text.encode(f"```calculator\n{a2}*{b2}\n```\n", add_special_tokens=False)
        tool = renderer.ids(out)
        answer = tok_text.encode(f"Answer: {out}", add_special_tokens=False) + [tok_text.eos_token_id]
        ids = prompt + call + tool + answer
        labels = [-100] * len(prompt) + call + [-100] * len(tool) + answer
        return ids, labels

    for step in range(steps):
        pairs = [example(r) for r in rng.sample(rows, batch)]
        width = max(len(i) for i, _ in pairs)
        ids = torch.tensor([i + [tok_run.pad_token_id] * (width - len(i)) for i, _ in pairs])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in pairs])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"warm start: {steps} call-format SFT steps (every call shown has wrong operands, no correct product or "
          f"answer), final loss {loss.item():.3f}", flush=True)


def main(argv):
    t0 = time.time()
    warm_steps = 600
    if "--warm-steps" in argv:
        i = argv.index("--warm-steps")
        warm_steps, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    run = toy.run_folder(argv)
    run.mkdir(parents=True, exist_ok=True)
    rows = make_data(run / "train.jsonl")
    warm_start(run / "init_model", rows, steps=warm_steps)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    folders = [f"model.path={run / 'init_model'}", f"data.path={run / 'train.jsonl'}", f"trainer.run_dir={run}"]
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(CONFIG), *folders, *argv]
    rc = subprocess.call(cmd)
    if rc:
        sys.exit(rc)
    toy.print_curve(run / "metrics.jsonl")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    used = [r.get("rollout/tool_using_frac") for r in rows if "rollout/tool_using_frac" in r]
    if used:
        print(f"responses that called the tool: first step {used[0]:.2f}, last step {used[-1]:.2f}")
    print(f"wall time {time.time() - t0:.0f} s (warm start included); metrics: {run / 'metrics.jsonl'}")


if __name__ == "__main__":
    main(sys.argv[1:])
