"""Train/inference log-prob gap of an MoE policy without and with R3 routing replay (issue 14).

The embedded engine samples responses (fp32 or bf16 weights) and records its routed experts; the fp32 Megatron actor
(1 rank) computes the old log-probs without replay (`none`) and replaying the engine's experts (`r3`). Printed per
engine dtype: max |trainer - engine| log-prob over all response tokens, and how many tokens the trainer routed
differently from the engine (any MoE layer) without replay.

    PYTHONPATH=$PWD python tools/bench_routing_replay_gap.py [--family qwen3_moe] [--prompts 8]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def samples(hf, dtype, n_prompts, seed=0):
    import random

    from dapo_megatron.rollout.engine import Engine

    rng = random.Random(seed)
    engine = Engine(hf, seed=seed, dtype=dtype)
    rows = []
    try:
        for _ in range(n_prompts):
            prompt = [rng.randrange(1, 120) for _ in range(rng.randrange(4, 12))]
            for o in engine.generate_sync(prompt, {"n": 2, "max_new_tokens": 16, "temperature": 1.0,
                                                   "ignore_eos": True}, return_routed_experts=True):
                rows.append({"prompt_ids": prompt, "response_ids": o["output_ids"],
                             "rollout_logprobs": [lp for lp, *_ in o["meta_info"]["output_token_logprobs"]],
                             "routed_experts": o["meta_info"]["routed_experts"]})
    finally:
        engine.shutdown()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    from conftest import run_torchrun

    from dapo_megatron.models.tiny import make_tiny_hf_model

    tmp = Path(tempfile.mkdtemp())
    hf = make_tiny_hf_model(tmp / "hf", args.family, seed=1)
    script = REPO / "tests" / "dist_scripts" / "moe_replay.py"
    print(f"{'engine dtype':12s} {'gap none':>10s} {'gap r3':>10s} {'routing flips (none)':>22s}")
    for dtype in ("float32", "bfloat16"):
        torch.save(samples(hf, dtype, args.prompts), tmp / f"{dtype}.pt")
        got = {}
        for mode in ("none", "r3"):
            run_torchrun(script, 1, hf, 1, 1, 1, mode, tmp / f"{dtype}.pt", tmp / f"{dtype}_{mode}.pt")
            got[mode] = torch.load(tmp / f"{dtype}_{mode}.pt")
        n = got["none"]
        print(f"{dtype:12s} {n['old_vs_engine']:10.3e} {got['r3']['old_vs_engine']:10.3e} "
              f"{int(n['engine_route_flips']):>10d} / {int(n['engine_route_tokens'])} tokens")


if __name__ == "__main__":
    main()
