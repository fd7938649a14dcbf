"""GSPO and CISPO against hand-computed values and gradients; every loss mode with every aggregation mode."""
import math

import pytest
import torch

from dapo_megatron.algo.loss import (LOSS_AGG_MODES, POLICY_LOSS_MODES, PolicyLossConfig, count_loss_seqs,
                                     count_loss_tokens, policy_loss)

L = math.log
GARBAGE = -1000.0  # a padded / masked position: its log-prob must change nothing


def gspo_batch():
    """Four sequences (old log-probs 0, so log-prob = log ratio), the last column padded on the first and last.

    A: ratios (1.2, 1.0), A=+1 -> s = sqrt(1.2) = 1.0954451 < 1.28: not clipped
    B: ratios (2, 1.5, 1), A=+1 -> s = 3^(1/3) = 1.4422496 > 1.28: clipped high, the whole sequence
    C: ratios (0.5, 0.8), A=-1 -> s = sqrt(0.4) = 0.6324555 < 0.8: clipped low
    D: ratios (1.5, 1.5), A=-1 -> s = 1.5: not clipped (GSPO has no dual-clip)
    """
    logp = torch.tensor([[L(1.2), 0.0, GARBAGE], [L(2.0), L(1.5), 0.0], [L(0.5), L(0.8), GARBAGE],
                         [L(1.5), L(1.5), GARBAGE]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]]).expand(4, 3) * mask
    return logp, torch.zeros(4, 3), adv, mask


GSPO = dict(loss_mode="gspo", clip_ratio_c=None)


def test_gspo_token_losses_and_gradients_by_hand():
    logp, old, adv, mask = gspo_batch()
    loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig(**GSPO, loss_agg_mode="token-sum"))
    loss.backward()
    s_a = math.sqrt(1.2)
    # token losses: A: -s_a twice; B: -1.28 three times; C: +0.8 twice; D: +1.5 twice
    assert loss.item() == pytest.approx(-2 * s_a - 3 * 1.28 + 2 * 0.8 + 2 * 1.5, abs=1e-6)
    # d(-A s_{i,t}) / d log pi_t = -A s_i where no clip binds, exactly 0 where it does and on masked tokens
    want = torch.tensor([[-s_a, -s_a, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.5, 1.5, 0.0]])
    torch.testing.assert_close(logp.grad, want, atol=1e-6, rtol=0)
    assert torch.count_nonzero(logp.grad[1:3]) == 0 and logp.grad[0, 2] == 0.0
    # 3 of 9 loss tokens clipped high (B), 2 clipped low (C); ppo_kl stays the token-level -mean(log r)
    assert m["pg_clipfrac_high"].item() == pytest.approx(3 / 9) and m["pg_clipfrac_low"].item() == pytest.approx(2 / 9)
    assert m["pg_clipfrac_dual"].item() == 0.0
    assert m["ppo_kl"].item() == pytest.approx(-(L(1.2) + L(2) + L(1.5) + L(0.5) + L(0.8) + 2 * L(1.5)) / 9)


def test_gspo_with_seq_mean_token_mean_is_the_papers_sequence_objective():
    logp, old, adv, mask = gspo_batch()
    loss, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig(**GSPO, loss_agg_mode="seq-mean-token-mean"))
    loss.backward()
    s_a = math.sqrt(1.2)
    assert loss.item() == pytest.approx((-s_a - 1.28 + 0.8 + 1.5) / 4, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-s_a / 8, -s_a / 8, 0], [0, 0, 0], [0, 0, 0],
                                                        [1.5 / 8, 1.5 / 8, 0]]), atol=1e-6, rtol=0)
    # the sequence objective -(1/G) sum_i A_i s_i, s_i = exp(mean log r) taken directly, on the unclipped A and D
    x = logp.detach()[[0, 3], :2].clone().requires_grad_()
    seq = -(torch.tensor([1.0, -1.0]) * torch.exp(x.mean(-1))).sum() / 4
    seq.backward()
    torch.testing.assert_close(logp.grad[[0, 3], :2], x.grad, atol=1e-7, rtol=0)


def test_gspo_ignores_masked_tokens_and_is_one_on_policy():
    logp, old, adv, mask = gspo_batch()
    other = logp.detach().clone()
    other[0, 2] = 50.0  # a different garbage value on the padded token: same loss
    cfg = PolicyLossConfig(**GSPO)
    a, _ = policy_loss(logp.detach(), old, adv, mask, cfg)
    b, _ = policy_loss(other, old, adv, mask, cfg)
    assert a.item() == b.item()
    on, m = policy_loss(logp.detach(), logp.detach(), adv, mask, cfg)  # s = 1: loss = -token-mean(A)
    assert on.item() == pytest.approx(-(2 + 3 - 2 - 2) / 9) and m["pg_clipfrac_high"].item() == 0.0


def test_gspo_paper_eps_clip_a_small_sequence_drift():
    # eps 3e-4 / 4e-4: a sequence whose mean log-ratio is 5e-4 (s = 1.0005) is clipped, 3e-4 (s = 1.0003) is not
    logp = torch.tensor([[4e-4, 6e-4], [2e-4, 4e-4]], requires_grad=True)
    cfg = PolicyLossConfig(**GSPO, clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="token-sum")
    loss, m = policy_loss(logp, torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2), cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-2 * 1.0004 - 2 * math.exp(3e-4), abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [-math.exp(3e-4)] * 2]), atol=1e-6, rtol=0)
    assert m["pg_clipfrac_high"].item() == 0.5


def test_cispo_token_losses_and_gradients_by_hand():
    # (log pi, ratio, A): weight = sg(clip(r, 0.8, 1.28)); loss = -A * weight * log pi; d/d log pi = -A * weight
    #   t0: -1.0, r 1.1 (inside),  A  2 -> loss  2.2, grad -2.2
    #   t1: -0.5, r 1.5 (clipped), A  1 -> loss  0.64, grad -1.28  (PPO would give 0 here: CISPO keeps it)
    #   t2: -2.0, r 0.5 (clipped), A -1 -> loss -1.6, grad  0.8
    #   t3: masked (garbage log-prob) -> 0, grad 0
    logp = torch.tensor([[-1.0, -0.5, -2.0, GARBAGE]], requires_grad=True)
    old = torch.tensor([[-1.0 - L(1.1), -0.5 - L(1.5), -2.0 - L(0.5), 0.0]])
    adv = torch.tensor([[2.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    cfg = PolicyLossConfig(loss_mode="cispo", clip_ratio_c=None, loss_agg_mode="token-sum")
    loss, m = policy_loss(logp, old, adv, mask, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(2.2 + 0.64 - 1.6, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.2, -1.28, 0.8, 0.0]]), atol=1e-6, rtol=0)
    assert m["pg_clipfrac_high"].item() == pytest.approx(1 / 3) and m["pg_clipfrac_low"].item() == pytest.approx(1 / 3)
    # token-mean: divided by the 3 loss tokens
    logp.grad = None
    loss, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig(loss_mode="cispo", clip_ratio_c=None))
    loss.backward()
    assert loss.item() == pytest.approx(1.24 / 3, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.2, -1.28, 0.8, 0.0]]) / 3, atol=1e-6, rtol=0)


def test_cispo_on_policy_gradient_is_the_reinforce_gradient():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_()
    adv = torch.randn(3, 4)
    cfg = PolicyLossConfig(loss_mode="cispo", clip_ratio_c=None, loss_agg_mode="token-sum")
    policy_loss(logp, logp.detach(), adv, torch.ones(3, 4), cfg)[0].backward()
    torch.testing.assert_close(logp.grad, -adv, atol=0, rtol=0)


def test_loss_modes_registered_and_dual_clip_refused():
    assert {"vanilla", "gspo", "cispo"} <= set(POLICY_LOSS_MODES)
    without_dual_clip = [m for m, fn in POLICY_LOSS_MODES.items() if not fn.dual_clip]
    assert {"gspo", "cispo"} <= set(without_dual_clip) and POLICY_LOSS_MODES["vanilla"].dual_clip
    for mode in without_dual_clip:
        with pytest.raises(ValueError, match=f"clip_ratio_c .*loss_mode={mode} set clip_ratio_c: null"):
            PolicyLossConfig(loss_mode=mode)
    with pytest.raises(ValueError, match="loss_mode must be one of"):
        PolicyLossConfig(loss_mode="ppo")


@pytest.mark.parametrize("agg", sorted(LOSS_AGG_MODES))
@pytest.mark.parametrize("mode", sorted(POLICY_LOSS_MODES))
def test_every_loss_mode_with_every_agg_mode_splits_into_micro_batches(mode, agg):
    torch.manual_seed(2)
    logp = (-torch.rand(6, 5)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, 5)
    rollout = old + 0.2 * torch.randn(6, 5)
    ref = logp.detach() + 0.1 * torch.randn(6, 5)
    adv = torch.randn(6, 1).expand(6, 5).contiguous()
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[3] = 0
    cfg = PolicyLossConfig(loss_mode=mode, loss_agg_mode=agg, loss_scale_factor=7, kl_coef=0.05,
                           clip_ratio_c=3.0 if mode == "vanilla" else None,
                           rollout_correction={"level": "sequence", "mode": "mask", "threshold": 1.2})
    full, _ = policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref, rollout_logprobs=rollout)
    g_full = torch.autograd.grad(full, logp)[0]
    assert torch.count_nonzero(g_full) > 0
    counts = {"global_token_count": count_loss_tokens(mask), "global_seq_count": count_loss_seqs(mask)}
    total = sum(policy_loss(logp[s], old[s], adv[s], mask[s], cfg, ref_logprobs=ref[s], rollout_logprobs=rollout[s],
                            **counts)[0] for s in (slice(0, 2), slice(2, 3), slice(3, 6)))
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(torch.autograd.grad(total, logp)[0], g_full)
