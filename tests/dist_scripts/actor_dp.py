"""torchrun script: the real Actor at TP x PP x DP (DP = world / (TP x PP)); argv: hf_dir tp pp out_file.

One launch checks, on fixed samples (different lengths, partly masked responses):
- old log-probs of a global batch of 8, and of a batch of 7 (not divisible by DP: every sample must get its values);
- one optimizer step for each of `token-mean` and `seq-mean-token-mean` (a fresh Actor each, same HF weights).
Rank 0 saves the log-probs and the full (TP-gathered, all PP stages) HF weights after each step, for the test to
compare with the DP=1 launch.
"""
import sys

import torch
import torch.distributed as dist

MODES = ("token-mean", "seq-mean-token-mean")


def make_samples(n, vocab, seed=0):
    from dapo_megatron.rollout.sample import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = 3 + i % 4, 2 + (5 * i) % 7
        mask = [1] * r
        if i % 3 == 1:
            mask[0] = 0  # a partly masked response
        s = Sample(prompt_ids=torch.randint(0, vocab, (p,), generator=g).tolist(),
                   response_ids=torch.randint(0, vocab, (r,), generator=g).tolist(),
                   rollout_logprobs=(-torch.rand(r, generator=g) - 4.0).tolist(), loss_mask=mask)
        s.metadata["advantage"] = float(torch.randn((), generator=g))
        out.append(s)
    return out


def full_weights(actor):
    """Every HF tensor of the model on every rank (pipeline stages exchanged)."""
    mine = {k: v.clone() for k, v in actor.hf_weights()}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def main():
    hf_dir, tp, pp, out_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from megatron.core import parallel_state as ps

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    dp = ps.get_data_parallel_world_size()
    result = {"dp": dp}
    # adam_eps well above the gradients' rounding: Adam's first step is lr * g / (|g| + eps), which for eps -> 0 is
    # lr * sign(g) and turns a 1e-9 gradient difference near g = 0 into a full lr step. With eps = 1e-3 the update is
    # smooth in g, so equal weights mean equal gradients.
    acfg = ActorConfig(global_batch_size=8, micro_batch_size=2, lr=1e-3, weight_decay=0.0, clip_grad=1.0,
                       adam_eps=1e-3)
    for mode in MODES:
        parallel.seed_all(1234)
        actor = Actor(ModelConfig(path=hf_dir), acfg, PolicyLossConfig(loss_agg_mode=mode, clip_ratio_c=None),
                      pad_id=0)
        vocab = actor.arch.vocab_size
        if mode == MODES[0]:
            batch, odd = make_samples(8, vocab), make_samples(7, vocab, seed=1)
            actor.compute_logprobs(batch)
            actor.compute_logprobs(odd)  # 7 samples over DP ranks
            result["old"] = [s.metadata["old_logprobs"] for s in batch]
            result["odd"] = [s.metadata["old_logprobs"] for s in odd]
        samples = make_samples(8, vocab)
        for s, old in zip(samples, result["old"]):
            # old policy a little off the current one, so ratios move and clipping can bind
            s.metadata["old_logprobs"] = [v + 0.1 * ((j % 3) - 1) for j, v in enumerate(old)]
        metrics = actor.train_step(samples)
        assert metrics["actor/update_ok"] == 1.0, metrics
        result[mode] = {"weights": full_weights(actor), "grad_norm": metrics["actor/grad_norm"],
                        "pg_loss": metrics["actor/pg_loss"]}
        if dp > 1:
            try:
                actor.train_step(samples[:dp + 1])
                raise AssertionError("a mini-batch not divisible by DP must be refused")
            except ValueError as e:
                assert "not a multiple of the data-parallel size" in str(e)
        del actor
    if dist.get_rank() == 0:
        torch.save(result, out_file)
    print(f"actor_dp OK rank {dist.get_rank()} dp={dp}", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
