"""Tool-result tokens (loss_mask 0, engine log-prob 0.0) change nothing the trainer computes, by numbers: a batch whose
responses hold tool tokens gives the same loss, gradient, token-mean denominator, entropy, clip fractions, KL and
log-prob gap as the same batch with the tool tokens cut out."""
import pytest
import torch

from dapo_megatron.algo.loss import PolicyLossConfig, agg_loss, count_loss_seqs, count_loss_tokens, policy_loss
from dapo_megatron.train.loop import _logprob_gap
from dapo_megatron.types import Sample

# Two responses; 1 = a model token, 0 = a tool token. Response 0: 3 model, 4 tool, 2 model; response 1: 5 model.
MASK = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
TOOL = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0] * 9], dtype=torch.bool)  # response 1's tail is padding


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = MASK.shape
    logp = -torch.rand(shape, generator=g) * 3
    old = logp + 0.4 * torch.randn(shape, generator=g)  # ratios on both sides of the clip range
    rollout = old + 0.05 * torch.randn(shape, generator=g)
    ref = old + 0.1 * torch.randn(shape, generator=g)
    ent = torch.rand(shape, generator=g)
    adv = torch.tensor([[1.5] * 9, [-0.7] * 9])
    # What the trainer holds at tool tokens: its own log-probs of them (any value), and the engine's 0.0.
    logp = torch.where(TOOL, torch.full(shape, -9.0), logp)
    rollout = torch.where(TOOL, torch.zeros(shape), rollout)
    return logp, old, adv, rollout, ref, ent


def compact(t):
    """The same batch with the tool tokens cut out (left-aligned, padded with zeros)."""
    rows = [row[~tool] for row, tool in zip(t, TOOL)]
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=t.dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "cispo"])
def test_tool_tokens_change_neither_loss_nor_gradient_nor_metrics(agg, mode):
    clip_c = 3.0 if mode == "vanilla" else None
    cfg = PolicyLossConfig(loss_mode=mode, loss_agg_mode=agg, clip_ratio_c=clip_c, kl_coef=0.1, entropy_coef=0.01,
                           tis_cap=2.0)
    logp, old, adv, rollout, ref, ent = batch()
    results = []
    for transform in (lambda t: t, compact):
        lp = transform(logp).clone().requires_grad_()
        e = transform(ent).clone().requires_grad_()
        mask = transform(MASK)
        loss, metrics = policy_loss(lp, transform(old), transform(adv), mask, cfg,
                                    global_token_count=count_loss_tokens(mask), global_seq_count=count_loss_seqs(mask),
                                    ref_logprobs=transform(ref), entropy=e, rollout_logprobs=transform(rollout))
        loss.backward()
        results.append((loss.detach(), metrics, lp.grad, e.grad, count_loss_tokens(mask)))
    (loss_a, m_a, g_a, ge_a, n_a), (loss_b, m_b, g_b, ge_b, n_b) = results
    assert n_a == n_b == 10  # the token-mean denominator counts model tokens only
    torch.testing.assert_close(loss_a, loss_b)
    assert m_a.keys() == m_b.keys()
    for k in m_a:  # entropy, clip fractions, KL, rollout-correction weights, token and sequence counts
        torch.testing.assert_close(m_a[k], m_b[k], msg=k)
    assert (g_a[TOOL] == 0).all() and (ge_a[TOOL] == 0).all()  # no gradient through a tool token
    torch.testing.assert_close(compact(g_a), g_b)
    torch.testing.assert_close(compact(ge_a), ge_b)


def test_token_mean_denominator_by_hand():
    loss_mat = torch.arange(18, dtype=torch.float32).reshape(2, 9)
    # model tokens of row 0: 0 1 2 7 8 (sum 18); of row 1: 9..13 (sum 55); 10 tokens
    assert agg_loss(loss_mat, MASK, "token-mean").item() == pytest.approx((18 + 55) / 10)
    assert agg_loss(loss_mat, MASK, "seq-mean-token-mean").item() == pytest.approx((18 / 5 + 55 / 5) / 2)


def test_logprob_gap_counts_model_tokens_only():
    s = Sample(prompt_ids=[1], response_ids=[5, 6, 7, 8], rollout_logprobs=[-1.0, 0.0, 0.0, -2.0],
               loss_mask=[1, 0, 0, 1], metadata={"old_logprobs": [-1.01, -7.0, -8.0, -2.02]})
    assert _logprob_gap([s]) == pytest.approx(0.02)
    s.loss_mask = None  # single-turn: every token counts
    assert _logprob_gap([s]) == pytest.approx(8.0)
