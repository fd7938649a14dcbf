"""torchrun, 2 processes (gloo): vocab-parallel log-probs over a padded vocabulary equal the real-vocabulary
reference, including a rank whose shard is padding only (vocab 101 padded to 256: rank 1 holds ids 128..255)."""
import torch
import torch.distributed as dist

from dapo_megatron.train.logprobs import vocab_parallel_logprobs


def check(rank, vocab, padded):
    torch.manual_seed(vocab)
    full = 3 * torch.randn(4, 3, padded)
    full[..., vocab:] = 40.0  # large padded logits: any leak into the normaliser shows
    target = torch.randint(0, vocab, (4, 3))
    target[0, 0] = vocab - 1
    g_lp, g_ent = torch.randn(4, 3), torch.randn(4, 3)
    v_local = padded // 2
    shard = full[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(shard, target, tp_group=dist.group.WORLD, chunk_size=5, compute_entropy=True,
                                      vocab_size=vocab)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    ref_logits = full[..., :vocab].clone().requires_grad_()
    logp = torch.log_softmax(ref_logits, dim=-1)
    ref_lp, ref_ent = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    ref_grad = torch.cat([ref_logits.grad, torch.zeros(4, 3, padded - vocab)], -1)[..., rank * v_local:
                                                                                 (rank + 1) * v_local]
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(shard.grad, ref_grad, atol=1e-5, rtol=0)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2, "run with --nproc_per_node=2"
    for vocab, padded in ((101, 256), (131, 256), (21, 22)):
        check(dist.get_rank(), vocab, padded)
    dist.destroy_process_group()
    print("vocab_pad_tp OK", flush=True)
