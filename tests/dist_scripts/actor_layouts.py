"""torchrun script: the actor's micro-batch layouts give the same numbers.

argv: hf_dir tp pp out_file [layout,...]. For each layout (padded, packed by count, packed by token budget, and the
recompute settings) a fresh Actor on the same weights computes the log-probs of a fixed set of variable-length
samples and takes one optimizer step; rank 0 saves the log-probs, gradients, step metrics and updated full weights
of every layout.
"""
import sys

import torch


def samples(vocab):
    from dapo_megatron.rollout.sample import Sample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(12):  # prompts 3..9 tokens, responses 1..23 tokens: every micro-batch is ragged
        p, r = 3 + (i * 5) % 7, 1 + (i * 7) % 23
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        mask = [1] * r
        if i == 4:
            mask = [0] * r  # a fully masked response
        elif r > 2:
            mask[1] = 0
        out.append(Sample(prompt_ids=ids[:p], response_ids=ids[p:], loss_mask=mask,
                          rollout_logprobs=(-torch.rand(r, generator=g) - 2.0).tolist(),
                          metadata={"advantage": float(torch.randn((), generator=g))}))
    return out


LAYOUTS = {
    "padded": {"use_remove_padding": False},
    "packed": {},
    "packed_budget": {"max_tokens_per_microbatch": 40},
    "padded_budget": {"use_remove_padding": False, "max_tokens_per_microbatch": 64},
    "selective": {"recompute_granularity": "selective"},
    "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
}


def full_head_logprobs(actor, batch):
    """Reference: the LM head on every position of each sample alone ([1, S], padded layout), then sliced."""
    from dapo_megatron.train.logprobs import vocab_parallel_logprobs
    from dapo_megatron.train.packing import pack_microbatch

    mbs = []
    for s in batch:
        mb = pack_microbatch([s], actor.pad_id, 8, packed=False)
        ids = mb["tokens"][0]
        mb["all_targets"] = torch.cat([ids[1:], ids[:1]])
        mb["head_index"] = None  # the hook passes everything through
        mbs.append(mb)

    def loss_fn(logits, mb):  # logits [S, V_local]: all positions
        lp, _ = vocab_parallel_logprobs(logits, mb["all_targets"].to(logits.device), vocab_size=actor.arch.vocab_size)
        return lp.sum() * 0, torch.ones((), dtype=torch.int), {"lp": lp.detach().cpu()}

    import torch.distributed as dist

    rec = actor._run(mbs, loss_fn, forward_only=True)  # [] off the last pipeline stage
    mine = [r["lp"][len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + len(s.response_ids)].tolist()
            for r, s in zip(rec, batch)]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return next(p for p in parts if p)


def main():
    hf_dir, tp, pp, out_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    names = sys.argv[5].split(",") if len(sys.argv) > 5 else list(LAYOUTS)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    results = {}
    for name in names:
        over = LAYOUTS[name]
        cfg = ActorConfig(global_batch_size=12, micro_batch_size=2 if "budget" not in name else 1, lr=1e-4,
                          weight_decay=0.0, **over)
        actor = Actor(ModelConfig(path=hf_dir), cfg, PolicyLossConfig(clip_ratio_c=3.0), pad_id=0)
        assert actor.config.recompute_granularity == over.get("recompute_granularity"), "recompute not applied"
        assert actor.config.recompute_method == over.get("recompute_method")
        assert actor.config.recompute_num_layers == over.get("recompute_num_layers")
        batch = samples(actor.arch.vocab_size)
        actor.compute_logprobs(batch, key="new")
        rec = {"logprobs": [s.metadata["new"] for s in batch],
               "num_microbatches": len(actor._layout(batch))}
        if name == "packed":
            rec["full_head"] = full_head_logprobs(actor, batch)
        for s in batch:
            s.metadata["old_logprobs"] = [x + 0.1 * ((i % 3) - 1) for i, x in enumerate(s.metadata["new"])]
        rec["metrics"] = actor.train_step(batch)
        grads = {(dist.get_rank(), n): p.main_grad.detach().clone() for n, p in actor.model.named_parameters()}
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, grads)
        rec["grads"] = {k: v for part in parts for k, v in part.items()}
        rec["weights"] = {k: v.detach().clone() for k, v in actor.hf_weights()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rec["weights"] if ps.get_tensor_model_parallel_rank() == 0 else {})
        rec["weights"] = {k: v for part in gathered for k, v in part.items()}
        results[name] = rec
        del actor
    if dist.get_rank() == 0:
        torch.save(results, out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
