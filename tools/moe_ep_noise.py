"""Where does EP=2 differ from EP=1 after one optimizer step? (issue 14; tests/test_moe.py
test_optimizer_step_at_ep2_equals_ep1). Runs tests/dist_scripts/moe_step.py (one DAPO step of the Actor, DP=2) in
several layouts with the gradients dumped, and prints side by side, against EP=1 with micro_batch_size 2:

  grad max|d|         the largest gradient difference (before clipping)
  grad rel (|g|>1e-6) the largest relative gradient difference where the gradient is not tiny
  weight max|d|       the largest weight difference after the step, and |g| at that element

Layouts: EP=2 (expert grads summed inside one GEMM over both ranks' tokens instead of an all-reduce of two), and
EP=1 with micro_batch_size 1 (the same math, only the order of the gradient sums changes); the aux loss off for the
order-only comparison (its per-micro-batch statistics would change the math).

    PYTHONPATH=$PWD python tools/moe_ep_noise.py [--family qwen2_moe]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen2_moe")
    args = ap.parse_args()
    from conftest import run_torchrun

    from dapo_megatron.models.tiny import make_tiny_hf_model

    tmp = Path(tempfile.mkdtemp())
    hf = make_tiny_hf_model(tmp / "hf", args.family, seed=3)
    script = REPO / "tests" / "dist_scripts" / "moe_step.py"

    def run(name, ep, mbs, aux=None):
        extra = [mbs] + ([aux] if aux is not None else [])
        run_torchrun(script, 2, hf, ep, tmp / f"{name}.pt", *extra, env={"DAPO_DUMP_GRADS": "1"})
        return torch.load(tmp / f"{name}.pt")

    def compare(a, b):
        g_abs = max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"])
        g_rel = 0.0
        for k in a["grads"]:
            big = a["grads"][k].abs() > 1e-6
            if big.any():
                d = (a["grads"][k] - b["grads"][k]).abs()[big] / a["grads"][k].abs()[big]
                g_rel = max(g_rel, float(d.max()))
        worst, at = 0.0, None
        for k in a["weights"]:
            d = (a["weights"][k] - b["weights"][k]).abs()
            if float(d.max()) > worst:
                worst, i = float(d.max()), int(d.argmax())
                at = (k, float(a["grads"][k].reshape(-1)[i]), float(b["grads"][k].reshape(-1)[i]))
        n_over = sum(int(((a["weights"][k] - b["weights"][k]).abs() > 1e-6).sum()) for k in a["weights"])
        return g_abs, g_rel, worst, n_over, at

    rows = []
    base = run("ep1", 1, 2)
    rows.append(("EP=2 vs EP=1 (aux on)", compare(base, run("ep2", 2, 2))))
    base0 = run("ep1_aux0", 1, 2, 0.0)
    rows.append(("EP=2 vs EP=1 (aux off)", compare(base0, run("ep2_aux0", 2, 2, 0.0))))
    rows.append(("EP=1 mbs1 vs mbs2 (aux off)", compare(base0, run("ep1_m1_aux0", 1, 1, 0.0))))
    print(f"{'comparison':32s} {'grad max|d|':>12s} {'grad rel':>10s} {'weight max|d|':>14s} {'#>1e-6':>7s}  "
          "worst element (name, g_a, g_b)")
    for name, (ga, gr, w, n, at) in rows:
        print(f"{name:32s} {ga:12.3e} {gr:10.3e} {w:14.3e} {n:7d}  {at[0]} {at[1]:.3e} {at[2]:.3e}")


if __name__ == "__main__":
    main()
