"""Megatron-LM vocabulary padding: sizes, pad on the way in / strip on the way out, padded columns masked out of
log-probs, entropy and the softmax normaliser (value and gradient), at TP=1 and across TP ranks."""
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.hf_config import UnsupportedModelError, arch_from_hf, check_parallel_sizes, padded_vocab_size
from dapo_megatron.models.tiny import tiny_config_dict
from dapo_megatron.models.weights import to_hf, to_megatron
from dapo_megatron.train.logprobs import vocab_parallel_logprobs

SCRIPTS = Path(__file__).parent / "dist_scripts"


def test_padded_size_is_megatron_lms():
    assert padded_vocab_size(151936, 128, 1) == 151936  # Qwen2.5: already a multiple of 128 x 4
    assert padded_vocab_size(151936, 128, 8) == 152576  # ceil(151936 / 1024) x 1024
    assert padded_vocab_size(101, 128, 2) == 256
    assert padded_vocab_size(101, 1, 2) == 102
    assert padded_vocab_size(128, 128, 2) == 256
    with pytest.raises(UnsupportedModelError, match="model.make_vocab_size_divisible_by=0 must be an integer >= 1"):
        padded_vocab_size(101, 0, 1)


def test_vocab_not_divisible_by_tp_is_no_longer_refused():
    check_parallel_sizes(arch_from_hf(tiny_config_dict("qwen2.5", 101)), 2, 2)


@pytest.mark.parametrize("name", ["embedding.word_embeddings.weight", "output_layer.weight"])
def test_pad_in_strip_out(name):
    arch = arch_from_hf(tiny_config_dict("qwen2", 101))
    hf = torch.randn(101, 64)
    shards = [to_megatron(name, (hf,), arch, tp_size=2, tp_rank=r, padded_vocab=256) for r in range(2)]
    assert [s.shape for s in shards] == [(128, 64), (128, 64)]
    assert torch.equal(shards[0][:101], hf[:101][:128]) and shards[1].abs().sum() == 0  # rank 1: padding only
    (back,) = to_hf(name, shards, arch).values()
    assert torch.equal(back, hf)


def _padded(logits, extra, value):
    return torch.cat([logits, torch.full((*logits.shape[:-1], extra), value)], dim=-1)


@pytest.mark.parametrize("pad_value", [0.0, 50.0, -3.0])
def test_padded_columns_change_nothing(pad_value):
    torch.manual_seed(0)
    vocab, extra = 37, 11
    logits = 3 * torch.randn(2, 5, vocab)
    target = torch.randint(0, vocab, (2, 5))
    g_lp, g_ent = torch.randn(2, 5), torch.randn(2, 5)
    ref_in = logits.clone().requires_grad_()
    ref_lp, ref_ent = vocab_parallel_logprobs(ref_in, target, chunk_size=3, compute_entropy=True)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    x = _padded(logits, extra, pad_value).requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, target, chunk_size=3, compute_entropy=True, vocab_size=vocab)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad[..., :vocab], ref_in.grad, atol=1e-6, rtol=0)
    assert torch.equal(x.grad[..., vocab:], torch.zeros_like(x.grad[..., vocab:]))
    if pad_value == 50.0:  # control: without vocab_size the padded columns do count
        unmasked, _ = vocab_parallel_logprobs(x.detach(), target)
        assert (unmasked - ref_lp).abs().max() > 1.0


@pytest.mark.dist
def test_padded_columns_masked_across_tp_ranks(torchrun):
    out = torchrun(SCRIPTS / "vocab_pad_tp.py", 2)
    assert out.count("vocab_pad_tp OK") == 2
