"""Data parallel through the real Actor: DP=2 (world 2), TP=2 x DP=2 and PP=2 x DP=2 (world 4) give the same old
log-probs and, after one optimizer step, the same weights as DP=1 on the same global batch (fp32)."""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model

SCRIPT = Path(__file__).parent / "dist_scripts" / "actor_dp.py"
MODES = ("token-mean", "seq-mean-token-mean")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    # 2 layers (PP=2 splits them), 4 heads / 2 kv heads (TP=2), untied so both embedding and head are checked
    return root, make_tiny_hf_model(root / "hf", "qwen2", seed=5, num_hidden_layers=2)


@pytest.fixture(scope="module")
def reference(tiny):
    from conftest import run_torchrun

    root, hf = tiny
    run_torchrun(SCRIPT, 1, hf, 1, 1, root / "dp1.pt")
    ref = torch.load(root / "dp1.pt")
    assert ref["dp"] == 1
    return ref


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _check_against_reference(got, ref, dp, exact_logprobs):
    assert got["dp"] == dp
    for name in ("old", "odd"):  # "odd": 7 samples over DP ranks, every one gets its log-probs
        assert [len(x) for x in got[name]] == [len(x) for x in ref[name]]
        diff = max(abs(a - b) for x, y in zip(got[name], ref[name]) for a, b in zip(x, y))
        # DP ranks pack different (token-balanced) micro-batches than DP=1, so matmuls see other row counts: the
        # log-probs agree to float rounding (fp32 ulp ~5e-7 at |logp| ~ 5), not bit for bit
        assert diff <= (1e-6 if exact_logprobs else 1e-5), f"{name} log-probs differ from DP=1 by {diff}"
    for mode in MODES:
        moved = _max_diff(ref[mode]["weights"], got[mode]["weights"])
        assert moved < 1e-6, f"{mode}: weights after one step differ from DP=1 by {moved}"
        assert got[mode]["grad_norm"] == pytest.approx(ref[mode]["grad_norm"], rel=1e-5)
        assert got[mode]["pg_loss"] == pytest.approx(ref[mode]["pg_loss"], rel=1e-5, abs=1e-7)
    # the step moved the weights (a check that cannot pass by doing nothing), and the two modes differ
    assert ref[MODES[0]]["grad_norm"] > 0
    assert _max_diff(ref[MODES[0]]["weights"], ref[MODES[1]]["weights"]) > 1e-5


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp, nproc", [(1, 1, 2), (2, 1, 4), (1, 2, 4)], ids=["dp2", "tp2_dp2", "pp2_dp2"])
def test_actor_dp_step_equals_dp1(tiny, reference, torchrun, tp, pp, nproc):
    root, hf = tiny
    out = root / f"tp{tp}_pp{pp}_n{nproc}.pt"
    torchrun(SCRIPT, nproc, hf, tp, pp, out)
    _check_against_reference(torch.load(out), reference, dp=nproc // (tp * pp), exact_logprobs=(tp, pp) == (1, 1))
