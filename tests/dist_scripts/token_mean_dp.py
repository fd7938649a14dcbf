"""torchrun, 2 processes (gloo) as data-parallel ranks: micro-batch losses normalised by the global counts, summed
over micro-batches and all-reduced (SUM) over ranks, give exactly the gradient of one full-batch loss.

The policy is a tiny linear map from fixed features to a 7-token vocabulary, so log-probs (through
`vocab_parallel_logprobs`, with entropy) are differentiable. Every rank can rebuild every micro-batch, so each one
also computes the single-process full-batch reference itself.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dapo_megatron.algo.loss import LOSS_AGG_MODES, PolicyLossConfig, count_loss_seqs, count_loss_tokens, policy_loss
from dapo_megatron.train.logprobs import vocab_parallel_logprobs

VOCAB, HIDDEN = 7, 5
# (num_seqs, T) of each rank's micro-batches: different token counts everywhere
SHAPES = {0: [(2, 5), (3, 3), (1, 7)], 1: [(2, 4), (1, 2), (3, 6)]}


def make_micro_batch(seed, n, t, weight):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, t, generator=g) > 0.25).float()
    mask[0, 0] = 1.0
    if n == 3:
        mask[1] = 0.0  # a fully masked (e.g. overlong-filtered) response
    mb = {"h": torch.randn(n, t, HIDDEN, generator=g), "target": torch.randint(0, VOCAB, (n, t), generator=g),
          "mask": mask, "adv": torch.randn(n, 1, generator=g).expand(n, t) * mask}
    with torch.no_grad():
        lp, _ = vocab_parallel_logprobs(mb["h"] @ weight, mb["target"])
    # old and reference policies a little off the current one, so that clips bind and the KL is not zero
    mb["old"] = lp + 0.4 * torch.randn(n, t, generator=g)
    mb["ref"] = lp + 0.2 * torch.randn(n, t, generator=g)
    return mb


def loss_of(mb, weight, cfg, **counts):
    lp, ent = vocab_parallel_logprobs(mb["h"] @ weight, mb["target"], compute_entropy=True)
    return policy_loss(lp, mb["old"], mb["adv"], mb["mask"], cfg, ref_logprobs=mb["ref"], entropy=ent, **counts)[0]


def pad_cat(tensors, t_max):
    return torch.cat([F.pad(x, [0, 0] * (x.dim() - 2) + [0, t_max - x.shape[1]]) for x in tensors])


def full_batch_grad(batches, weight, cfg):
    t_max = max(mb["mask"].shape[1] for mb in batches)
    full = {k: pad_cat([mb[k] for mb in batches], t_max) for k in batches[0]}
    w = weight.clone().requires_grad_()
    loss = loss_of(full, w, cfg)
    loss.backward()
    return loss.detach(), w.grad


def distributed_grad(mine, weight, cfg, use_global_counts=True):
    counts = {}
    if use_global_counts:
        stats = torch.stack([sum(count_loss_tokens(mb["mask"]) for mb in mine),
                             sum(count_loss_seqs(mb["mask"]) for mb in mine)]).float()
        dist.all_reduce(stats)  # summed before any backward, as the actor does
        counts = {"global_token_count": stats[0], "global_seq_count": stats[1]}
    w = weight.clone().requires_grad_()
    total = torch.zeros(())
    for mb in mine:
        loss = loss_of(mb, w, cfg, **counts)
        loss.backward()  # micro-batch losses are summed, never divided by their number
        total += loss.detach()
    dist.all_reduce(w.grad)  # SUM over data-parallel ranks
    dist.all_reduce(total)
    return total, w.grad


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2, "run with --nproc_per_node=2"
    weight = torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(0))
    batches = {r: [make_micro_batch(100 * r + i, n, t, weight) for i, (n, t) in enumerate(shapes)]
               for r, shapes in SHAPES.items()}
    everything = batches[0] + batches[1]

    for mode in LOSS_AGG_MODES:  # every registered mode, the next one too
        cfg = PolicyLossConfig(loss_agg_mode=mode, loss_scale_factor=8, kl_coef=0.05, entropy_coef=0.01)
        ref_loss, ref_grad = full_batch_grad(everything, weight, cfg)
        loss, grad = distributed_grad(batches[rank], weight, cfg)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
        print(f"rank {rank} {mode}: loss {loss.item():.6f} == {ref_loss.item():.6f}, "
              f"max|grad diff| {(grad - ref_grad).abs().max().item():.2e}", flush=True)

    # Control: normalising each micro-batch by its own token count gives a different gradient.
    cfg = PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01)
    _, ref_grad = full_batch_grad(everything, weight, cfg)
    _, local_grad = distributed_grad(batches[rank], weight, cfg, use_global_counts=False)
    diff = (local_grad - ref_grad).abs().max().item()
    assert diff > 1e-2, f"per-micro-batch normalisation should differ from the full batch, diff {diff}"
    dist.destroy_process_group()
    print(f"token_mean_dp OK (local-count control differs by {diff:.3f})", flush=True)


if __name__ == "__main__":
    main()
