import math

import pytest
import torch

from dapo_megatron.algo.loss import (LOSS_AGG_MODES, PolicyLossConfig, agg_loss, clipped_pg_loss, count_loss_seqs,
                                     count_loss_tokens, kl_penalty, policy_loss)


def exact_log(r: float) -> float:
    """A float32 x with torch.exp(x) == float32(r) exactly, so boundary ratios hit the clip bounds exactly."""
    target = torch.tensor(r, dtype=torch.float32)
    x = torch.log(target)
    for _ in range(64):
        got = torch.exp(x)
        if got == target:
            return x.item()
        x = torch.nextafter(x, torch.tensor(math.inf) if got < target else torch.tensor(-math.inf))
    raise AssertionError(f"no float32 log of {r}")


def run_tokens(ratios, advantages, cfg=None):
    """Per-token loss values and d loss / d logprob for one sequence with old_logprobs = 0 (token-sum)."""
    cfg = cfg or PolicyLossConfig(loss_agg_mode="token-sum")
    logprobs = torch.tensor([[exact_log(r) for r in ratios]], requires_grad=True)
    adv = torch.tensor([advantages])
    token_losses, _ = clipped_pg_loss(torch.exp(logprobs.detach()), adv, cfg)
    loss, metrics = policy_loss(logprobs, torch.zeros_like(logprobs), adv, torch.ones_like(adv), cfg)
    loss.backward()
    return token_losses[0], logprobs.grad[0], metrics


# ------------------------------------------------------------------------------------------- Clip-Higher

# (ratio, advantage, hand-computed token loss, hand-computed d loss / d logprob), default clips 0.2 / 0.28 / c = 3.
# Unclipped: loss = -A r and d(-A exp(lp)) / d lp = -A r. Clipped: loss = -A * bound, gradient 0.
CASES = {
    "A>0, r>1+high: clipped": (1.5, 2.0, -2.56, 0.0),
    "A>0, r<1-low: not clipped": (0.5, 2.0, -1.0, -1.0),
    "A<0, r<1-low: clipped": (0.5, -2.0, 1.6, 0.0),
    "A<0, 1+high<r<c: not clipped": (1.5, -2.0, 3.0, 3.0),
    "A>0, inside": (1.1, 2.0, -2.2, -2.2),
    "A<0, inside": (0.9, -2.0, 1.8, 1.8),
    "A>0, r == 1+high: boundary, not clipped": (1.28, 2.0, -2.56, -2.56),
    "A<0, r == 1-low: boundary, not clipped": (0.8, -2.0, 1.6, 1.6),
    "A<0, r > c: dual-clip": (4.0, -2.0, 6.0, 0.0),
    "A<0, r == c: boundary, not dual-clipped": (3.0, -2.0, 6.0, 6.0),
    "A == 0": (1.5, 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_clip_higher_token_loss_and_gradient(name):
    ratio, adv, want_loss, want_grad = CASES[name]
    token_loss, grad, _ = run_tokens([ratio], [adv])
    assert token_loss.item() == pytest.approx(want_loss, abs=1e-6)
    assert grad.item() == pytest.approx(want_grad, abs=1e-6)
    if want_grad == 0.0:
        assert grad.item() == 0.0  # exactly zero, not merely small


def test_gradient_equals_unclipped_gradient_where_no_clip_binds():
    torch.manual_seed(0)
    logprobs = (0.6 * torch.randn(1, 400)).requires_grad_()
    adv = torch.randn(1, 400)
    cfg = PolicyLossConfig(loss_agg_mode="token-sum")
    loss, _ = policy_loss(logprobs, torch.zeros_like(logprobs), adv, torch.ones_like(adv), cfg)
    loss.backward()
    r = torch.exp(logprobs.detach())
    binds = ((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8)) | ((adv < 0) & (r > 3.0))
    assert 50 < binds.sum() < 350  # both kinds of token are present
    unclipped = torch.autograd.grad((-adv * torch.exp(logprobs)).sum(), logprobs)[0]
    assert torch.equal(logprobs.grad[binds], torch.zeros(int(binds.sum())))
    torch.testing.assert_close(logprobs.grad[~binds], unclipped[~binds], atol=0, rtol=0)


def test_dual_clip_off_when_clip_ratio_c_is_none():
    cfg = PolicyLossConfig(loss_agg_mode="token-sum", clip_ratio_c=None)
    token_loss, grad, metrics = run_tokens([4.0], [-2.0], cfg)
    assert token_loss.item() == pytest.approx(8.0) and grad.item() == pytest.approx(8.0)  # -A r, uncapped
    assert metrics["pg_clipfrac_dual"].item() == 0.0


def test_independent_clip_ranges():
    # clip_ratio_high = 0.5: r = 1.4 with A > 0 is no longer clipped; clip_ratio_low = 0.05: r = 0.9, A < 0 is
    cfg = PolicyLossConfig(loss_agg_mode="token-sum", clip_ratio_low=0.05, clip_ratio_high=0.5)
    token_loss, grad, _ = run_tokens([1.4, 0.9], [1.0, -1.0], cfg)
    torch.testing.assert_close(token_loss, torch.tensor([-1.4, 0.95]))
    torch.testing.assert_close(grad, torch.tensor([-1.4, 0.0]))


def test_metrics_clip_fractions_and_padding_is_ignored():
    # 6 real tokens (one per clip kind and three free ones), then 2 padding tokens with garbage log-probs
    logprobs = torch.tensor([[exact_log(r) for r in (1.5, 0.5, 4.0, 1.1, 0.9, 1.0)] + [-1000.0, 50.0]],
                            requires_grad=True)
    old = torch.tensor([[0.0] * 6 + [0.0, -60.0]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 5.0, -5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    loss, m = policy_loss(logprobs, old, adv, mask, PolicyLossConfig())
    # token losses: -1.28, 0.8, 3.0, -1.1, 0.9, -1.0 -> sum 1.32, token-mean over 6 = 0.22
    assert loss.item() == pytest.approx(0.22, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert torch.equal(logprobs.grad[0, 6:], torch.zeros(2))
    assert m["pg_clipfrac_high"].item() == pytest.approx(1 / 6)
    assert m["pg_clipfrac_low"].item() == pytest.approx(1 / 6)
    assert m["pg_clipfrac_dual"].item() == pytest.approx(1 / 6)
    # ppo_kl = mean(old - new) = -mean(log r) = -(ln 1.5 + ln 0.5 + ln 4 + ln 1.1 + ln 0.9 + 0) / 6
    want = -(math.log(1.5) + math.log(0.5) + math.log(4.0) + math.log(1.1) + math.log(0.9)) / 6
    assert m["ppo_kl"].item() == pytest.approx(want, abs=1e-6)
    assert m["num_tokens"].item() == 6
    assert m["pg_loss"].item() == pytest.approx(0.22, abs=1e-6)
    assert not any(v.requires_grad for v in m.values())


def test_on_policy_invariants():
    # first step: logprobs == old -> ratio 1 everywhere, ppo_kl exactly 0, nothing clipped, loss = -token-mean(A)
    logprobs = torch.tensor([[-0.3, -2.0, -1.2], [-0.7, -0.1, -5.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, m = policy_loss(logprobs, logprobs.detach().clone(), adv, mask, PolicyLossConfig())
    assert m["ppo_kl"].item() == 0.0
    assert m["pg_clipfrac_high"].item() == m["pg_clipfrac_low"].item() == m["pg_clipfrac_dual"].item() == 0.0
    assert loss.item() == pytest.approx(-(3.0 - 1.0) / 5)


# --------------------------------------------------------------------------------------------- aggregation

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, 100.0, 100.0]])  # 100 = masked, must not count
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("mode, kwargs, want", [
    ("token-mean", {}, 16 / 5),  # (1 + 2 + 3 + 4 + 6) / 5 tokens
    ("token-mean", {"global_token_count": 8}, 2.0),  # 16 / 8
    ("token-sum", {}, 16.0),
    ("token-sum", {"global_token_count": 8}, 16.0),  # a sum needs no count
    ("seq-mean-token-mean", {}, 3.5),  # (6 / 3 + 10 / 2) / 2 sequences
    ("seq-mean-token-mean", {"global_seq_count": 4}, 1.75),  # 7 / 4
    ("seq-mean-token-sum", {}, 8.0),  # (6 + 10) / 2
    ("seq-mean-token-sum", {"global_seq_count": 4}, 4.0),  # 16 / 4
    ("seq-mean-token-sum-norm", {"norm_length": 4}, 2.0),  # (6 / 4 + 10 / 4) / 2
    ("seq-mean-token-sum-norm", {"norm_length": 4, "global_seq_count": 4}, 1.0),  # 16 / (4 * 4)
    ("seq-mean-token-sum-norm", {"norm_length": 10}, 0.8),  # 16 / (2 * 10): the padded T = 4 plays no part
])
def test_agg_modes(mode, kwargs, want):
    assert agg_loss(LOSS_MAT, MASK, mode, **kwargs).item() == pytest.approx(want)


def test_the_five_modes_are_registered():
    assert {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
            "token-sum"} <= set(LOSS_AGG_MODES)


def test_each_agg_mode_declares_whether_it_needs_a_length():
    """Validation reads the declaration, never the name: a mode that needs loss_scale_factor is refused without one
    (in the section alone; AlgorithmConfig fills it in later), the others are not."""
    from dapo_megatron.config import AlgorithmConfig

    for mode, fn in LOSS_AGG_MODES.items():
        if fn.needs_norm_length:
            with pytest.raises(ValueError, match=f"loss_agg_mode='{mode}' needs loss_scale_factor"):
                PolicyLossConfig(loss_agg_mode=mode)
            assert AlgorithmConfig(loss_agg_mode=mode).loss_scale_factor is None
        else:
            PolicyLossConfig(loss_agg_mode=mode)
    assert [m for m, fn in LOSS_AGG_MODES.items() if fn.needs_norm_length] == ["seq-mean-token-sum-norm"]


def test_fully_masked_sequences_and_micro_batches():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    # the overlong-filtered second response counts neither as tokens nor as a sequence
    assert count_loss_tokens(mask).item() == 3 and count_loss_seqs(mask).item() == 1
    assert agg_loss(LOSS_MAT, mask, "seq-mean-token-mean").item() == pytest.approx(2.0)  # (6 / 3) / 1
    assert agg_loss(LOSS_MAT, mask, "seq-mean-token-sum").item() == pytest.approx(6.0)
    empty = torch.zeros_like(mask)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert agg_loss(LOSS_MAT, empty, mode).item() == 0.0  # 0, not NaN


def test_unknown_mode_and_missing_norm_length():
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'mean'"):
        agg_loss(LOSS_MAT, MASK, "mean")
    with pytest.raises(ValueError, match="loss_scale_factor"):
        agg_loss(LOSS_MAT, MASK, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
def test_micro_batches_with_global_counts_sum_to_the_full_batch(mode):
    torch.manual_seed(1)
    logprobs = (-torch.rand(6, 5)).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(6, 5)
    adv = torch.randn(6, 1).expand(6, 5).contiguous()
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[3] = 0  # one fully masked response
    cfg = PolicyLossConfig(loss_agg_mode=mode, loss_scale_factor=7)
    full, _ = policy_loss(logprobs, old, adv, mask, cfg)
    g_full = torch.autograd.grad(full, logprobs)[0]
    counts = {"global_token_count": count_loss_tokens(mask), "global_seq_count": count_loss_seqs(mask)}
    total = sum(policy_loss(logprobs[s], old[s], adv[s], mask[s], cfg, **counts)[0]
                for s in (slice(0, 2), slice(2, 3), slice(3, 6)))
    g_split = torch.autograd.grad(total, logprobs)[0]
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_split, g_full)


# ---------------------------------------------------------------------------------------- KL, entropy, TIS

def test_kl_estimators_by_hand():
    # d = logp - ref = (0.5, -1)
    logp, ref, mask = torch.tensor([[0.5, -1.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1", mask), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2", mask), torch.tensor([[0.125, 0.5]]))  # d^2 / 2
    # k3 = exp(-d) + d - 1: exp(-0.5) - 0.5 = 0.1065307, e - 2 = 0.7182818
    k3 = torch.tensor([[0.1065307, 0.7182818]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3", mask), k3)
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl", mask), k3)


def test_kl_term_in_the_loss():
    # A = 0, so the loss is only kl_coef * token-mean(k3) = 0.1 * (0.1065307 + 0.7182818) / 2 = 0.04124063
    # d/dd k3 = 1 - exp(-d): (0.3934693, -1.7182818), times 0.1 / 2
    logp = torch.tensor([[0.5, -1.0]], requires_grad=True)
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k3")
    zeros = torch.zeros(1, 2)
    loss, m = policy_loss(logp, logp.detach(), zeros, torch.ones(1, 2), cfg, ref_logprobs=zeros)
    loss.backward()
    assert loss.item() == pytest.approx(0.04124063, abs=1e-7)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.01967347, -0.08591409]]))
    assert m["kl"].item() == pytest.approx(0.4124063, abs=1e-6)


def test_kl_is_reported_but_not_trained_when_kl_coef_is_zero():
    logp = torch.tensor([[0.5, -1.0]], requires_grad=True)
    zeros = torch.zeros(1, 2)
    loss, m = policy_loss(logp, logp.detach(), zeros, torch.ones(1, 2), PolicyLossConfig(), ref_logprobs=zeros)
    assert loss.item() == 0.0 and m["kl"].item() == pytest.approx(0.4124063, abs=1e-6)


def test_entropy_bonus():
    # A = 0: loss = -0.01 * token-mean(1, 3) = -0.02; d loss / d entropy = -0.01 / 2 per token
    entropy = torch.tensor([[1.0, 3.0, 50.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    zeros = torch.zeros(1, 3)
    cfg = PolicyLossConfig(entropy_coef=0.01)
    loss, m = policy_loss(zeros, zeros, zeros, mask, cfg, entropy=entropy)
    loss.backward()
    assert loss.item() == pytest.approx(-0.02)
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.005, -0.005, 0.0]]))
    assert m["entropy"].item() == pytest.approx(2.0)


def test_truncated_importance_sampling():
    # on-policy for the trainer (r = 1), A = 1 -> pg loss -1 per token, weighted by min(exp(old - rollout), 2):
    # old - rollout = (ln 1.5, ln 4) -> weights (1.5, 2 capped); token-sum = -3.5, grads (-1.5, -2)
    logp = torch.zeros(1, 2, requires_grad=True)
    rollout = torch.tensor([[-math.log(1.5), -math.log(4.0)]], requires_grad=True)
    cfg = PolicyLossConfig(loss_agg_mode="token-sum", tis_cap=2.0)
    loss, m = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), cfg, rollout_logprobs=rollout)
    loss.backward()
    assert loss.item() == pytest.approx(-3.5, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, -2.0]]))
    assert rollout.grad is None  # the weight is a constant
    assert m["rollout_corr_weight"].item() == pytest.approx(1.75, abs=1e-6)
    assert m["rollout_corr_truncated_token_frac"].item() == 0.5


# ------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, key", [
    ({"clip_ratio_low": 1.01}, "clip_ratio_low"),
    ({"clip_ratio_low": -0.1}, "clip_ratio_low"),
    ({"clip_ratio_high": -0.1}, "clip_ratio_high"),
    ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
    ({"loss_agg_mode": "mean"}, "loss_agg_mode"),
    ({"loss_agg_mode": "seq-mean-token-sum-norm"}, "loss_scale_factor"),
    ({"loss_scale_factor": 0}, "loss_scale_factor"),
    ({"kl_coef": -1.0}, "kl_coef"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"entropy_coef": float("nan")}, "entropy_coef"),
    ({"tis_cap": 0.0}, "tis_cap"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PolicyLossConfig(**kwargs)


@pytest.mark.parametrize("kwargs, key", [
    ({"kl_coef": 0.1}, "ref_logprobs"), ({"entropy_coef": 0.1}, "entropy"), ({"tis_cap": 2.0}, "rollout_logprobs")])
def test_missing_inputs_for_enabled_options(kwargs, key):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=key):
        policy_loss(x, x, x, x, PolicyLossConfig(**kwargs))


def test_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(x, x, torch.zeros(2), x, PolicyLossConfig())
