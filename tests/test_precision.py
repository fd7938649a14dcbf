"""The GPU precision path forced on CPU: actor.bf16 (bf16 parameters, fp32 gradients and main weights) with
actor.use_distributed_optimizer at DP=2, against the fp32 actor with the plain optimizer (tests/dist_scripts/
precision_dp.py does the work in one launch)."""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.train.actor import ActorConfig

SCRIPT = Path(__file__).parent / "dist_scripts" / "precision_dp.py"


def test_precision_keys_resolve_by_device():
    assert ActorConfig().precision(on_gpu=True) == {"bf16": True, "use_distributed_optimizer": True}
    assert ActorConfig().precision(on_gpu=False) == {"bf16": False, "use_distributed_optimizer": False}
    forced = ActorConfig(bf16=True, use_distributed_optimizer=True)
    assert forced.precision(on_gpu=False) == {"bf16": True, "use_distributed_optimizer": True}
    assert ActorConfig(bf16=False).precision(on_gpu=True)["bf16"] is False


@pytest.mark.parametrize("key", ["bf16", "use_distributed_optimizer"])
def test_precision_keys_refuse_non_booleans(key):
    with pytest.raises(ValueError, match=f"actor.{key}="):
        ActorConfig(**{key: "fp16"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import run_torchrun

    t = tmp_path_factory.mktemp("precision")
    hf = make_tiny_hf_model(t / "hf", "qwen2", seed=5, num_hidden_layers=2)  # untied: embedding and head
    run_torchrun(SCRIPT, 2, hf, t, t / "out.pt")
    return torch.load(t / "out.pt")


@pytest.mark.dist
def test_bf16_path_really_runs(run):
    assert run["dp"] == 2
    assert run["fp32"]["param_dtypes"] == ["torch.float32"] and run["fp32"]["optimizers"] == ["FP32Optimizer"]
    assert run["bf16"]["param_dtypes"] == ["torch.bfloat16"]
    assert run["bf16"]["optimizers"] == ["DistributedOptimizer"]
    assert run["fp32"]["update_ok"] == 1.0 and run["bf16"]["update_ok"] == 1.0


@pytest.mark.dist
def test_optimizer_state_is_sharded_over_dp(run):
    """Bytes per rank, summed from the tensors (Adam's scalar step counts aside): fp32 + plain optimizer holds
    4 (weight) + 4 (grad) + 8 (Adam m, v) bytes per parameter on every rank; bf16 + distributed optimizer
    2 + 4 + (4 fp32 main + 8 Adam) / DP: each rank holds half of the main weights and Adam state."""
    ranks = run["bytes_by_rank"]
    n = ranks[0]["fp32"]["numel"]
    slack = 1024  # DDP pads its buffers to a multiple of DP x 64 elements; Adam's per-tensor step counts
    for r in ranks:
        fp32, bf16 = r["fp32"], r["bf16"]
        assert fp32["numel"] == bf16["numel"] == n
        assert fp32["params"] == 4 * n and 4 * n <= fp32["grads"] < 4 * n + slack
        assert fp32["main"] == 0 and 8 * n <= fp32["adam"] < 8 * n + slack
        assert bf16["params"] == 2 * n and 4 * n <= bf16["grads"] < 4 * n + slack
        assert abs(bf16["main"] - 4 * n / 2) < slack and abs(bf16["adam"] - 8 * n / 2) < slack
    assert sum(r["bf16"]["main"] for r in ranks) == 4 * n  # the shards tile the parameters exactly once
    total = {k: sum(r[k][p] for p in ("params", "grads", "main", "adam")) for r in ranks[:1] for k in ("fp32", "bf16")}
    assert abs(total["bf16"] / n - 12) < 0.05 and abs(total["fp32"] / n - 16) < 0.05  # 2 + 4 + 12 / 2 vs 16


@pytest.mark.dist
def test_bf16_logprobs_within_bf16_tolerance_of_fp32(run):
    for key in ("logp0", "logp1"):
        gap = (run["bf16"][key] - run["fp32"][key]).abs()
        # bf16 keeps 8 significand bits: a relative step of 2^-8 = 0.004 per rounding of weights and activations
        # measured: max 0.0021 / 0.0025, mean 0.0008 at |log p| ~ 4.9 (vocab 128); fp32 differs from itself by 0
        assert 0 < gap.max() < 0.02, (key, gap.max())
        assert gap.mean() < 0.004, (key, gap.mean())


@pytest.mark.dist
def test_bf16_distributed_checkpoint_resumes_exactly(run):
    r = run["bf16"]
    assert torch.equal(r["resumed_logp1"], r["logp1"])
    assert sorted(r["resumed_weights2"]) == sorted(r["weights2"])
    for k, v in r["weights2"].items():
        assert torch.equal(r["resumed_weights2"][k], v), k


def test_resume_with_other_precision_is_refused_in_one_line(tmp_path):
    from dapo_megatron.train.checkpoint import CheckpointError, _check_precision

    saved = {"bf16": True, "use_distributed_optimizer": True}
    _check_precision(tmp_path, saved, dict(saved))
    _check_precision(tmp_path, None, {"bf16": False, "use_distributed_optimizer": False})  # saved before the record
    with pytest.raises(CheckpointError) as e:
        _check_precision(tmp_path, saved, {"bf16": True, "use_distributed_optimizer": False})
    assert str(e.value) == (f"{tmp_path} was saved with actor.use_distributed_optimizer=true: set the same to resume "
                            "it (its optimizer state's layout depends on it)")
