"""torchrun, 2 processes (gloo): vocab-parallel log-probs at TP=2 equal the full-vocab reference.

Every rank builds the same full logits, keeps its vocabulary shard and checks value and gradient of its shard, once
with an explicit group and once through megatron's parallel_state (tp_group=None).
"""
import torch
import torch.distributed as dist

from dapo_megatron.train.logprobs import vocab_parallel_logprobs


def check(tp_group, rank, world, temperature):
    torch.manual_seed(0)
    n, vocab = 9, 2 * 13
    full = 3 * torch.randn(3, n // 3, vocab)
    target = torch.randint(0, vocab, (3, n // 3))
    target[0, 0], target[1, 0] = 0, vocab - 1  # first column of rank 0, last column of rank 1
    g_lp, g_ent = torch.randn(3, n // 3), torch.randn(3, n // 3)
    v_local = vocab // world
    shard = full[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(shard, target, tp_group=tp_group, chunk_size=2, compute_entropy=True,
                                      temperature=temperature)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    ref_logits = full.clone().requires_grad_()
    logp = torch.log_softmax(ref_logits / temperature, dim=-1)
    ref_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    ref_grad = ref_logits.grad[..., rank * v_local:(rank + 1) * v_local]

    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(shard.grad, ref_grad, atol=1e-5, rtol=0)

    # the in-place path (the train step's: entropy only logged, the logits overwritten by their gradient)
    leaf = full[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    logits = leaf * 1.0
    lp, ent = vocab_parallel_logprobs(logits, target, tp_group=tp_group, chunk_size=2, compute_entropy=True,
                                      temperature=temperature, differentiable_entropy=False, overwrite_logits=True)
    assert not torch.equal(logits, leaf) and not ent.requires_grad
    (lp * g_lp).sum().backward()
    ref_logits = full.clone().requires_grad_()
    ref_lp = torch.log_softmax(ref_logits / temperature, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    (ref_lp * g_lp).sum().backward()
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(leaf.grad, ref_logits.grad[..., rank * v_local:(rank + 1) * v_local], atol=1e-5, rtol=0)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node=2"
    for temperature in (1.0, 0.7):
        check(dist.group.WORLD, rank, world, temperature)

    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    check(None, rank, world, 1.0)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    print("logprobs_tp OK", flush=True)


if __name__ == "__main__":
    main()
