"""torchrun script: the GPU precision path (actor.bf16 + actor.use_distributed_optimizer) against fp32 on CPU; argv:
hf_dir work_dir out_file.

One launch (DP = world size) builds, from the same HF weights:
- the fp32 actor with the plain optimizer (the reference) and the bf16 actor with the distributed optimizer;
- log-probs of fixed samples from both, then one optimizer step on each, then log-probs again;
- the model-state bytes of each rank, summed from the tensors: parameters, DDP gradient buffers, and what the
  optimizer holds (main weights and Adam state);
- bf16: a checkpoint after step 1, step 2, then a fresh bf16 actor that loads the checkpoint and takes step 2 again
  (its weights must equal the uninterrupted ones bit for bit).
Rank 0 saves what it measured; the test compares.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from actor_dp import full_weights, make_samples  # noqa: E402


def model_state_bytes(actor) -> dict:
    """Bytes this rank holds for the model states (each tensor counted once, by storage)."""
    seen = set()

    def nbytes(tensors):
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    params = nbytes(p for p in actor.model.parameters())
    grads = nbytes(b.grad_data for b in _ddp_buffers(actor.model))
    inner = [o.optimizer for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])]
    # fp32 + plain optimizer: the optimizer's parameters are the model's own (counted once, under params)
    main = nbytes(p for o in inner for g in o.param_groups for p in g["params"])
    adam = nbytes(v for o in inner for st in o.state.values() for v in st.values())
    return {"params": params, "grads": grads, "main": main, "adam": adam,
            "numel": sum(p.numel() for p in actor.model.parameters())}


def _ddp_buffers(model):
    return list(getattr(model, "buffers", [])) + list(getattr(model, "expert_parallel_buffers", []))


def logprobs(actor, samples):
    actor.compute_logprobs(samples)
    out = [torch.tensor(s.metadata.pop("old_logprobs")) for s in samples]
    return torch.cat(out)


def train_samples(vocab, old):
    samples = make_samples(8, vocab)
    for s, o in zip(samples, old.split([len(s.response_ids) for s in samples])):
        s.metadata["old_logprobs"] = [v + 0.1 * ((j % 3) - 1) for j, v in enumerate(o.tolist())]
    return samples


def main():
    hf_dir, work, out_file = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    from megatron.core import parallel_state as ps

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig
    from dapo_megatron.train.checkpoint import load_checkpoint, save_checkpoint

    parallel.initialize(parallel.ParallelConfig())
    result = {"dp": ps.get_data_parallel_world_size()}

    def make(bf16):
        parallel.seed_all(1234)
        cfg = ActorConfig(global_batch_size=8, micro_batch_size=2, lr=1e-3, weight_decay=0.0, clip_grad=1.0,
                          adam_eps=1e-3, bf16=bf16, use_distributed_optimizer=bf16)
        return Actor(ModelConfig(path=hf_dir), cfg, PolicyLossConfig(clip_ratio_c=None), pad_id=0)

    for name, bf16 in (("fp32", False), ("bf16", True)):
        actor = make(bf16)
        vocab = actor.arch.vocab_size
        probe = make_samples(8, vocab, seed=3)
        r = {"param_dtypes": sorted({str(p.dtype) for p in actor.model.parameters()}),
             "optimizers": [type(o).__name__ for o in getattr(actor.optimizer, "chained_optimizers",
                                                              [actor.optimizer])],
             "logp0": logprobs(actor, probe)}
        steps = [train_samples(vocab, r["logp0"]), train_samples(vocab, r["logp0"] - 0.05)]
        m1 = actor.train_step(steps[0])
        r["bytes"] = model_state_bytes(actor)  # after a step: Adam's state exists
        r["logp1"] = logprobs(actor, probe)
        r["update_ok"] = m1["actor/update_ok"]
        if bf16:
            save_checkpoint(work / "ckpt", 1, actor, {"step": 1})
        actor.train_step(steps[1])
        r["weights2"] = full_weights(actor)
        if bf16:
            del actor
            actor = make(bf16)
            load_checkpoint(work / "ckpt" / "iter_0000001", actor)
            r["resumed_logp1"] = logprobs(actor, probe)
            actor.train_step(steps[1])
            r["resumed_weights2"] = full_weights(actor)
        result[name] = r
        del actor
    all_bytes = [None] * dist.get_world_size()
    dist.all_gather_object(all_bytes, {k: result[k]["bytes"] for k in ("fp32", "bf16")})
    result["bytes_by_rank"] = all_bytes
    if dist.get_rank() == 0:
        torch.save(result, out_file)
    print(f"precision_dp OK rank {dist.get_rank()}", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
