"""`make demo`'s toy task learns in the GPU precision configuration too (slow: two full demo runs at DP=2).

The demo's model and data (examples/toy/run.py), then `dapo-megatron train` on two ranks (DP=2) twice: fp32 with the
plain optimizer, and actor.bf16 + actor.use_distributed_optimizer. The runs are not bitwise reproducible (engine
batch composition, README), so the bf16 curve must stay within the noise of the fp32 one: the same learning, the
final accuracy within 0.15 (runs of the fp32 demo end between ~0.6 and ~0.8).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 150


def _accuracy(run: Path) -> list:
    return [json.loads(line).get("rollout/accuracy", 0.0) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.dist
def test_toy_learns_in_bf16_with_distributed_optimizer_like_fp32(tmp_path):
    sys.path.insert(0, str(REPO / "examples" / "toy"))
    import run as toy

    rows = toy.make_data(tmp_path / "train.jsonl")
    toy.warm_start(tmp_path / "init_model", rows)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    curves = {}
    for name, flags in (("fp32", "false"), ("bf16", "true")):
        run_dir = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "dapo_megatron.cli", "train", "--config", "examples/toy/config.yaml",
               f"model.path={tmp_path / 'init_model'}", f"data.path={tmp_path / 'train.jsonl'}",
               f"trainer.run_dir={run_dir}", f"trainer.num_steps={STEPS}", f"actor.bf16={flags}",
               f"actor.use_distributed_optimizer={flags}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
        curves[name] = _accuracy(run_dir)
        assert len(curves[name]) == STEPS
    first = {k: sum(v[:10]) / 10 for k, v in curves.items()}
    last = {k: sum(v[-10:]) / 10 for k, v in curves.items()}
    print(f"accuracy first 10 -> last 10 steps: {first} -> {last}")
    assert last["fp32"] - first["fp32"] > 0.3 and last["bf16"] - first["bf16"] > 0.3, (first, last)
    assert abs(last["bf16"] - last["fp32"]) < 0.15, last
