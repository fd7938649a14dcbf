"""Rollout correction (TIS truncates, MIS masks) at token and sequence level, on hand-made log-prob gaps."""
import math

import pytest
import torch

from dapo_megatron.algo.loss import PolicyLossConfig, policy_loss
from dapo_megatron.algo.rollout_correction import RolloutCorrectionConfig, rollout_correction_weights

L = math.log
# old - rollout gaps; the last token is masked (its huge gap must change nothing)
TOKEN_GAPS = torch.tensor([[L(1.5), L(4.0), L(0.5), L(100.0)]])
TOKEN_MASK = torch.tensor([[1, 1, 1, 0]])
# sequence 0: gaps (ln 2, ln 8) -> geometric mean sqrt(16) = 4; sequence 1: (ln 0.5, ln 2, masked) -> 1
SEQ_GAPS = torch.tensor([[L(2.0), L(8.0), 0.0], [L(0.5), L(2.0), L(1000.0)]])
SEQ_MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])


def weights(gaps, mask, **cfg):
    return rollout_correction_weights(gaps, torch.zeros_like(gaps), mask, RolloutCorrectionConfig(**cfg))


def test_token_truncate():
    w, m = weights(TOKEN_GAPS, TOKEN_MASK, level="token", mode="truncate", threshold=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.5, 2.0, 0.5, 0.0]]))
    assert m["rollout_corr_weight"].item() == pytest.approx(4.0 / 3)
    assert m["rollout_corr_truncated_token_frac"].item() == pytest.approx(1 / 3)
    assert "rollout_corr_truncated_seq_frac" not in m


def test_token_mask_with_both_bounds():
    w, m = weights(TOKEN_GAPS, TOKEN_MASK, level="token", mode="mask", threshold=2.0, threshold_low=0.6)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.0, 0.0, 0.0]]))  # 4 > 2 and 0.5 < 0.6 are masked
    assert m["rollout_corr_weight"].item() == pytest.approx(0.5)
    assert m["rollout_corr_masked_token_frac"].item() == pytest.approx(2 / 3)


def test_sequence_truncate_uses_the_geometric_mean():
    w, m = weights(SEQ_GAPS, SEQ_MASK, level="sequence", mode="truncate", threshold=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 0.0], [1.0, 1.0, 0.0]]))
    assert m["rollout_corr_weight"].item() == pytest.approx(1.5)
    assert m["rollout_corr_truncated_seq_frac"].item() == 0.5
    assert m["rollout_corr_truncated_token_frac"].item() == 0.5
    w, _ = weights(SEQ_GAPS, SEQ_MASK, level="sequence", mode="truncate", threshold=5.0)
    torch.testing.assert_close(w, torch.tensor([[4.0, 4.0, 0.0], [1.0, 1.0, 0.0]]))  # below the bound: exact


def test_sequence_mask_drops_whole_sequences():
    w, m = weights(SEQ_GAPS, SEQ_MASK, level="sequence", mode="mask", threshold=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert m["rollout_corr_masked_seq_frac"].item() == 0.5
    assert m["rollout_corr_masked_token_frac"].item() == 0.5
    assert m["rollout_corr_weight"].item() == pytest.approx(0.5)


def test_weights_scale_the_policy_gradient_only():
    # on-policy for the trainer (r = 1), A = 1: token loss -1 weighted by w; token-sum; sequence-level mask
    logp = torch.zeros(2, 3, requires_grad=True)
    rollout = -SEQ_GAPS.clone().requires_grad_()
    cfg = PolicyLossConfig(loss_agg_mode="token-sum", kl_coef=0.1,
                           rollout_correction={"level": "sequence", "mode": "mask", "threshold": 2.0})
    ref = torch.full((2, 3), -0.5)
    loss, m = policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), SEQ_MASK, cfg, rollout_logprobs=rollout,
                          ref_logprobs=ref)
    loss.backward()
    k3 = math.exp(-0.5) + 0.5 - 1  # the KL term is not weighted: 4 tokens x 0.1 x k3
    assert loss.item() == pytest.approx(-2.0 + 4 * 0.1 * k3, abs=1e-6)
    dk3 = 0.1 * (1 - math.exp(-0.5))
    torch.testing.assert_close(logp.grad, torch.tensor([[dk3, dk3, 0.0], [-1 + dk3, -1 + dk3, 0.0]]))
    assert rollout.grad is None
    assert m["rollout_corr_masked_seq_frac"].item() == 0.5


def test_tis_cap_maps_onto_token_truncate():
    cfg = PolicyLossConfig(tis_cap=2.0)
    assert cfg.rollout_correction == RolloutCorrectionConfig(level="token", mode="truncate", threshold=2.0)
    with pytest.raises(ValueError, match="tis_cap and rollout_correction are both set"):
        PolicyLossConfig(tis_cap=2.0, rollout_correction={"level": "sequence", "threshold": 2.0})


@pytest.mark.parametrize("kwargs, message", [
    ({"level": "tokens", "threshold": 2.0}, "rollout_correction.level='tokens'"),
    ({"level": "token", "mode": "clip", "threshold": 2.0}, "rollout_correction.mode='clip'"),
    ({"level": "token"}, "rollout_correction.threshold=None must be > 0"),
    ({"threshold": 2.0}, "level is null"),
    ({"level": "token", "threshold": 2.0, "threshold_low": 0.5}, "mode=mask only"),
    ({"level": "token", "mode": "mask", "threshold": 2.0, "threshold_low": 3.0}, "threshold_low=3.0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutCorrectionConfig(**kwargs)


def test_missing_rollout_logprobs():
    x = torch.zeros(1, 2)
    cfg = PolicyLossConfig(rollout_correction={"level": "token", "threshold": 2.0})
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(x, x, x, x, cfg)
