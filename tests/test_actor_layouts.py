"""Packed (padding-free) micro-batches, token budgets, the response-only LM head and activation recompute give the
numbers of the padded layout: log-probs, gradients and one optimizer step (tests/dist_scripts/actor_layouts.py)."""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model

SCRIPT = Path(__file__).parent / "dist_scripts" / "actor_layouts.py"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("layouts") / "hf", "qwen2.5", seed=1)


def _max_diff(a, b):
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def _check(results, base, lp_tol=1e-5, update_tol=1e-6, grad_tol=1e-6):
    """Every layout of `results` against `base` (the padded layout on one process)."""
    for name, rec in results.items():
        assert _max_diff(rec["logprobs"], base["logprobs"]) < lp_tol, name
        assert rec["metrics"]["actor/pg_loss"] == pytest.approx(base["metrics"]["actor/pg_loss"], rel=1e-5), name
        assert rec["metrics"]["actor/grad_norm"] == pytest.approx(base["metrics"]["actor/grad_norm"], rel=1e-5)
        for k, w in base["weights"].items():  # one Adam step at lr 1e-4
            assert (rec["weights"][k] - w).abs().max() < update_tol, (name, k)
    if "packed" in results:  # response-only head == the head on every position, sliced
        assert _max_diff(results["packed"]["full_head"], results["packed"]["logprobs"]) < lp_tol


def _grads_close(results, base, tol=1e-6):
    for name, rec in results.items():
        for k, g in base["grads"].items():  # relative to the tensor's largest entry
            assert (rec["grads"][k] - g).abs().max() <= tol * g.abs().max().clamp(min=1e-12), (name, k)


@pytest.fixture(scope="module")
def single(hf, tmp_path_factory, torchrun_module):
    out = tmp_path_factory.mktemp("single") / "r.pt"
    torchrun_module(SCRIPT, 1, hf, 1, 1, out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def torchrun_module():
    from tests.conftest import run_torchrun

    return run_torchrun


@pytest.mark.dist
def test_layouts_and_recompute_equal_padded(single):
    # padded, packed, packed with a token budget, padded with a budget, selective / full (uniform, block) recompute
    assert set(single) == {"padded", "packed", "packed_budget", "padded_budget", "selective", "full_uniform",
                           "full_block"}
    _check(single, single["padded"])
    _grads_close(single, single["padded"])  # same parameter sharding: gradients compare entry by entry
    assert single["padded"]["metrics"]["actor/grad_norm"] > 0.1  # the step really moved the weights


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), pytest.param(1, 1, marks=pytest.mark.slow)],
                         ids=["tp2", "pp2", "dp2"])  # DP=2 with the packed layout: also tests/test_parallel_dp.py
def test_packed_and_response_head_at_tp2_pp2_dp2(hf, single, tmp_path, torchrun, tp, pp):
    # dp2: two data-parallel ranks on a token-balanced partition, one with a token budget per micro-batch
    out = tmp_path / "r.pt"
    torchrun(SCRIPT, 2, hf, tp, pp, out, "padded,packed,packed_budget")
    r = torch.load(out, weights_only=False)
    _check(r, r["padded"])  # packed == padded at this parallel layout
    # == the one-process run: Adam's first step is ~lr * sign(grad), so entries whose gradient is ~0 may move by a
    # few 1e-6 at lr 1e-4 when the reduction order changes (TP / PP / DP); log-probs, loss, grad norm stay tight
    _check(r, single["padded"], update_tol=5e-6)


@pytest.mark.gpu
def test_packed_thd_with_transformer_engine_equals_padded_gpu(hf, tmp_path, torchrun):
    # GPU: TE attention on THD with cu_seqlens (PackedSeqParams) vs TE on padded [b, s]; bf16 params, so the
    # tolerances are bf16's, not fp32's
    out = tmp_path / "r.pt"
    torchrun(SCRIPT, 1, hf, 1, 1, out, "padded,packed")
    r = torch.load(out, weights_only=False)
    assert _max_diff(r["packed"]["logprobs"], r["padded"]["logprobs"]) < 3e-2
    assert _max_diff(r["packed"]["full_head"], r["packed"]["logprobs"]) < 3e-2
    assert r["packed"]["metrics"]["actor/grad_norm"] == pytest.approx(r["padded"]["metrics"]["actor/grad_norm"],
                                                                      rel=2e-2)
