"""torchrun script (TP=2 x PP=pp): the actor with sequence parallelism on and off gives the same numbers.

argv: hf_dir out_file layout,... pp [ckpt_dir] (layouts: packed, padded). For each layout and SP off / on, a fresh
Actor on the same weights (pad_to_multiple_of=1, so only SP's own padding to a multiple of TP is applied) computes
the log-probs of ragged samples (their largest gap to the rollout's log-probs is the logged
train_infer_logprob_diff_max), takes one optimizer step (loss, grad norm, entropy), and records the norm weights'
gradients and the updated weights; with SP, the reference policy (train/reference.py) gives the same log-probs.
At PP=1 it also counts the bytes saved for backward inside each transformer layer over one long micro-batch
(saved_tensors_hooks, each storage once, parameters excluded). With ckpt_dir the packed SP run then saves a
checkpoint there and records what sp_resume.py (TP=1) must reproduce from it: the log-probs and a second step.
Rank 0 saves everything.
"""
import sys

import torch

from tests.dist_scripts.actor_layouts import samples


def saved_bytes_per_layer(actor, seq: int) -> dict:
    """Mean bytes saved for backward inside one transformer layer for one [seq] micro-batch (padded layout):
    "all", and "no_scores" without the [.., seq, seq] attention scores and mask (Korthikanti's flash-attention
    model has no s^2 term). Each storage counts once; parameters do not count."""
    from dapo_megatron.train.packing import pack_microbatch
    from dapo_megatron.types import Sample

    module = actor.model.module
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, actor.arch.vocab_size, (seq,), generator=g).tolist()
    mb = pack_microbatch([Sample(prompt_ids=ids[:seq // 2], response_ids=ids[seq // 2:],
                                 rollout_logprobs=[0.0] * (seq - seq // 2))], 0, actor.multiple, packed=False)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, inside, total = set(), [False], {"all": 0, "no_scores": 0}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params and ptr not in seen:
            seen.add(ptr)
            total["all"] += t.untyped_storage().nbytes()
            if tuple(t.shape[-2:]) != (seq, seq):
                total["no_scores"] += t.untyped_storage().nbytes()
        return t

    layers = module.decoder.layers
    handles = [m.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)) for m in layers]
    handles += [m.register_forward_hook(lambda *_: inside.__setitem__(0, False)) for m in layers]
    actor.head.index = mb["head_index"]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(mb["tokens"], mb["position_ids"], None)
    finally:
        actor.head.index = None
        for h in handles:
            h.remove()
    out.sum().backward()  # frees the graph
    actor.model.zero_grad_buffer()
    return {k: v / len(layers) for k, v in total.items()}


BATCH = 6  # ragged samples (one fully masked), 2 micro-batches of 3
SEQ = 96  # tokens of the activation-count micro-batch (not a hidden size of the tiny models: shapes stay distinct)


def off_policy(batch, key):
    """old_logprobs = the log-probs under `key`, off by a little, so that clipping and the ratio are exercised."""
    for s in batch:
        s.metadata["old_logprobs"] = [x + 0.1 * ((i % 3) - 1) for i, x in enumerate(s.metadata[key])]


def after_step(actor, batch) -> dict:
    """Log-probs of `batch` under the current weights and the metrics of one more step (consumes the batch)."""
    actor.compute_logprobs(batch, key="now")
    out = {"logprobs": [s.metadata["now"] for s in batch]}
    off_policy(batch, "now")
    out["metrics"] = actor.train_step(batch)
    out["weights"] = {k: v.detach().clone() for k, v in actor.hf_weights()}  # the optimizer state moved them
    return out


def main():
    hf_dir, out_file = sys.argv[1], sys.argv[2]
    names, pp = sys.argv[3].split(","), int(sys.argv[4])
    ckpt = sys.argv[5] if len(sys.argv) > 5 else None
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig
    from dapo_megatron.train.loop import _logprob_gap  # the logged rollout/train_infer_logprob_diff_max

    results = {}
    for sp in (False, True):
        # groups are made once; each initialize records its sequence_parallel for the models built after it
        parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=pp,
                                                    sequence_parallel=sp), seed=1)
        for name in names:
            cfg = ActorConfig(global_batch_size=BATCH, micro_batch_size=3, lr=1e-4, weight_decay=0.0,
                              pad_to_multiple_of=1, use_remove_padding=name == "packed")
            actor = Actor(ModelConfig(path=hf_dir, make_vocab_size_divisible_by=1), cfg,
                          PolicyLossConfig(clip_ratio_c=3.0, entropy_coef=0.01), pad_id=0)
            assert actor.config.sequence_parallel == sp and actor.multiple == (2 if sp else 1)
            batch = samples(actor.arch.vocab_size)[:BATCH]
            actor.compute_logprobs(batch)
            rec = {"logprobs": [s.metadata["old_logprobs"] for s in batch], "gap": _logprob_gap(batch)}
            if sp and name == names[0]:
                from dapo_megatron.train.reference import ReferencePolicy

                ref = ReferencePolicy(ModelConfig(path=hf_dir, make_vocab_size_divisible_by=1), cfg, pad_id=0)
                assert ref.config.sequence_parallel and ref.multiple == 2
                ref.compute_logprobs(batch)
                rec["ref_logprobs"] = [s.metadata.pop("ref_logprobs") for s in batch]
                del ref
            off_policy(batch, "old_logprobs")
            rec["metrics"] = actor.train_step(batch)
            norms = {n: p.main_grad.detach().clone() for n, p in actor.model.named_parameters() if "norm" in n}
            rec["norm_grads"] = norms
            rec["norm_tagged"] = sorted(n for n, p in actor.model.named_parameters()
                                        if getattr(p, "sequence_parallel", False))
            rec["token_norms"] = sorted(n for n, _ in actor.model.named_parameters()
                                        if n.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight",
                                                       "final_layernorm.weight")))
            weights = {k: v.detach().clone() for k, v in actor.hf_weights()}
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, weights if ps.get_tensor_model_parallel_rank() == 0 else {})
            rec["weights"] = {k: v for part in gathered for k, v in part.items()}
            if name == names[0] and pp == 1:
                rec["saved_bytes_per_layer"] = saved_bytes_per_layer(actor, seq=SEQ)
                rec["hidden_size"], rec["seq"] = actor.arch.hidden_size, SEQ
            if ckpt and sp and name == "packed":
                from dapo_megatron.train.checkpoint import save_checkpoint

                save_checkpoint(ckpt, 1, actor, {}, hf_config_dir=hf_dir)
                rec["resume"] = after_step(actor, batch)
            results[(name, sp)] = rec
            del actor
    if dist.get_rank() == 0:
        torch.save(results, out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
