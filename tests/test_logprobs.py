from pathlib import Path

import pytest
import torch

from dapo_megatron.train.logprobs import vocab_parallel_logprobs

SCRIPTS = Path(__file__).parent / "dist_scripts"


def reference(logits, target, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def value_and_grads(fn, logits, target, g_lp, g_ent):
    logits = logits.detach().clone().requires_grad_()
    lp, ent = fn(logits, target)
    grad_lp = torch.autograd.grad((lp * g_lp).sum(), logits, retain_graph=True)[0]
    grad_ent = torch.autograd.grad((ent * g_ent).sum(), logits)[0]
    return lp, ent, grad_lp, grad_ent


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_log_softmax_in_value_and_gradient(chunk_size, temperature):
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 5, 37)  # [batch, seq, vocab]; 10 tokens, so chunks of 4 leave a remainder
    target = torch.randint(0, 37, (2, 5))
    g_lp, g_ent = torch.randn(2, 5), torch.randn(2, 5)

    def ours(x, t):
        return vocab_parallel_logprobs(x, t, chunk_size=chunk_size, compute_entropy=True, temperature=temperature)

    got = value_and_grads(ours, logits, target, g_lp, g_ent)
    want = value_and_grads(lambda x, t: reference(x, t, temperature), logits, target, g_lp, g_ent)
    for name, a, b in zip(("logprob", "entropy", "grad via logprob", "grad via entropy"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_entropy_off_returns_none_and_same_logprobs():
    torch.manual_seed(1)
    logits = torch.randn(6, 11, requires_grad=True)
    target = torch.randint(0, 11, (6,))
    lp, ent = vocab_parallel_logprobs(logits, target, chunk_size=4)
    assert ent is None
    lp.sum().backward()
    ref_lp, _ = reference(logits.detach(), target)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    ref_logits = logits.detach().clone().requires_grad_()
    reference(ref_logits, target)[0].sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-5, rtol=0)


def test_bf16_logits_give_fp32_logprobs_and_bf16_grad():
    torch.manual_seed(2)
    logits = (4 * torch.randn(8, 64)).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 64, (8,))
    lp, ent = vocab_parallel_logprobs(logits, target, chunk_size=3, compute_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32
    ref_logits = logits.detach().float().requires_grad_()  # the same bf16 values, computed in fp32
    ref_lp, ref_ent = reference(ref_logits, target)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    (lp.sum() + ent.sum()).backward()
    (ref_lp.sum() + ref_ent.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, atol=1e-2, rtol=1e-2)


def test_qwen_sized_vocab_against_float64():
    # fp32 sums over 151,936 entries: a naive dot-product accumulation is off by ~1e-3 in the entropy
    torch.manual_seed(3)
    logits = (4 * torch.randn(4, 151936)).to(torch.bfloat16)
    target = torch.randint(0, 151936, (4,))
    lp, ent = vocab_parallel_logprobs(logits, target, chunk_size=3, compute_entropy=True)
    logp = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(lp.double(), logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)


def test_out_of_range_target_is_minus_logsumexp_not_an_error():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    lp, _ = vocab_parallel_logprobs(logits, torch.tensor([-100]))
    assert lp.item() == pytest.approx(-torch.logsumexp(logits[0], 0).item())


def test_no_grad_and_shape_errors():
    with torch.no_grad():
        lp, _ = vocab_parallel_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))
    torch.testing.assert_close(lp, torch.full((2,), -1.3862944))  # log(1/4)
    with pytest.raises(ValueError, match="leading dims"):
        vocab_parallel_logprobs(torch.zeros(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs(torch.zeros(2, 4), torch.tensor([0, 1]), chunk_size=0)


@pytest.mark.dist
def test_tensor_parallel_2_matches_full_vocab(torchrun):
    out = torchrun(SCRIPTS / "logprobs_tp.py", 2)
    assert out.count("logprobs_tp OK") == 2


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_overwrite_logits_path_equals_the_recompute_path(entropy, temperature):
    # fp32 logits the caller is done with: the softmax is kept in their buffer and becomes the gradient in place
    torch.manual_seed(4)
    full = 3 * torch.randn(13, 40)
    target = torch.randint(0, 37, (13,))
    g_lp = torch.randn(13)
    results = []
    for overwrite in (False, True):
        leaf = full.clone().requires_grad_()
        logits = leaf * 1.0  # a non-leaf, as the output layer's logits are
        lp, ent = vocab_parallel_logprobs(logits, target, chunk_size=4, compute_entropy=entropy,
                                          temperature=temperature, vocab_size=37, differentiable_entropy=False,
                                          overwrite_logits=overwrite)
        assert torch.equal(logits, leaf) != overwrite  # overwritten only on the in-place path
        (lp * g_lp).sum().backward()
        results.append((lp.detach(), ent, leaf.grad))
    (lp0, ent0, grad0), (lp1, ent1, grad1) = results
    ref_lp, ref_ent = reference(full[:, :37], target, temperature)
    torch.testing.assert_close(lp1, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad1, grad0, atol=1e-6, rtol=0)
    assert torch.all(grad1[:, 37:] == 0)  # padded vocabulary columns
    if entropy:
        assert not ent1.requires_grad
        torch.testing.assert_close(ent1, ref_ent, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent1, ent0, atol=1e-6, rtol=0)
    else:
        assert ent0 is None and ent1 is None


def test_overwrite_logits_is_refused_by_autograd_when_another_backward_saved_them():
    leaf = torch.randn(3, 5, requires_grad=True)
    logits = leaf * 1.0
    squared = logits * logits  # saves logits for its backward
    lp, _ = vocab_parallel_logprobs(logits, torch.tensor([0, 1, 2]), overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + squared.sum()).backward()
