"""torchrun script: routing replay (actor.routing_replay) on an MoE actor; rank 0 saves what was measured.
argv: hf_dir tp pp ep mode samples_file out_file

  samples_file: torch.save'd list of dicts (prompt_ids, response_ids, rollout_logprobs, routed_experts) from the engine.
  Measured: the old-log-prob pass vs the engine's log-probs; per router forward, whether the routing megatron used
  equals the replayed indices; with r2 (and none, for contrast) after perturbing the router weights, how many tokens
  the update routed differently from the old-log-prob pass (read back from the routers' routing maps)."""
import sys

import torch


def main():
    hf_dir, tp, pp, ep, mode, samples_file, out_file = sys.argv[1:8]
    tp, pp, ep = int(tp), int(pp), int(ep)
    import torch.distributed as dist

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig
    from dapo_megatron.train.routing_replay import decode_routed_experts, local_routers, token_owners
    from dapo_megatron.types import Sample

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                expert_model_parallel_size=ep, expert_tensor_parallel_size=1))
    rows = torch.load(samples_file)
    samples = [Sample(**r) for r in rows]
    for i, s in enumerate(samples):
        s.metadata["advantage"] = 1.0 if i % 2 else -1.0
    actor = Actor(ModelConfig(path=hf_dir), ActorConfig(global_batch_size=len(samples), micro_batch_size=2, lr=1e-3,
                                                        routing_replay=mode), PolicyLossConfig(), pad_id=0)
    topk = actor.arch.moe.topk
    state = {"mb": None, "phase": None, "bad": 0, "checked": 0, "chosen": {}}
    orig_before = actor.replay.before_forward

    def before(mb, record):
        state["mb"] = mb
        orig_before(mb, record)

    actor.replay.before_forward = before
    samples_of = {}

    def hook_for(layer):
        def hook(_mod, _inp, out):
            routing_map = out[1].detach()
            chosen = routing_map.nonzero()[:, 1].view(-1, topk)  # [N_local, k] ascending
            for l, t in actor.replay.last_used:
                if l == layer:  # the routing used is exactly the replayed one
                    state["checked"] += 1
                    state["bad"] += int((chosen != t.sort(dim=1).values).any(dim=1).sum())
            mb = state["mb"]
            if tp > 1:  # sequence parallel: this rank routed 1/tp of the tokens; gather them (TP rank 0 counts)
                from megatron.core import parallel_state as ps

                parts = [torch.empty_like(chosen) for _ in range(tp)]
                dist.all_gather(parts, chosen.contiguous(), group=ps.get_tensor_model_parallel_group())
                chosen = torch.cat(parts)
                if ps.get_tensor_model_parallel_rank() != 0:
                    return
            if not mb["dummy"]:
                owner, pos = token_owners(mb["lengths"], True, mb["tokens"].shape[1])
                for i, key in enumerate(mb["keys"]):
                    sel = owner == i
                    state["chosen"][(state["phase"], key, layer)] = chosen[sel][pos[sel].argsort()]
        return hook

    for layer, r in local_routers(actor.model.module):
        r.register_forward_hook(hook_for(layer))
    # tag each micro-batch with its samples' keys (prompt + response), to compare the two passes per sample
    orig_mbs = actor._microbatches

    def mbs_with_keys(ss, layout, replay=False):
        out = orig_mbs(ss, layout, replay)
        for mb, idx in zip(out, layout):
            mb["keys"] = [tuple(ss[i].prompt_ids + ss[i].response_ids) for i in idx]
        return out

    actor._microbatches = mbs_with_keys
    state["phase"] = "old"
    actor.compute_logprobs(samples)
    diff = max(abs(a - b) for s in samples for a, b in zip(s.metadata["old_logprobs"], s.rollout_logprobs))
    with torch.no_grad():  # move the routers: the update's own top-k would now differ from the old pass's
        g = torch.Generator().manual_seed(0)
        for _, r in local_routers(actor.model.module):
            r.weight.add_(torch.randn(r.weight.shape, generator=g) * r.weight.std() * 2.0)
    state["phase"] = "update"
    actor.train_step(samples)
    changed, total = 0, 0
    engine = {tuple(s.prompt_ids + s.response_ids): decode_routed_experts(s.routed_experts, actor.arch.num_layers, topk)
              for s in samples if s.routed_experts}
    flipped, seen = 0, 0  # tokens the old-log-prob pass routed differently from the engine (any layer)
    for (phase, key, layer), t in state["chosen"].items():
        if phase == "old" and key in engine:
            e = engine[key][:, layer].long().sort(dim=1).values
            flipped += int((t[:len(e)] != e).any(dim=1).sum())
            seen += len(e)
    for (phase, key, layer), t in state["chosen"].items():
        if phase == "update" and ("old", key, layer) in state["chosen"]:
            old = state["chosen"][("old", key, layer)]
            n = len(key) - 1  # the last token feeds no loss term (and the engine never routed it)
            changed += int((t[:n] != old[:n]).any(dim=1).sum())
            total += n
    stats = torch.tensor([state["bad"], state["checked"], changed, total, flipped, seen], dtype=torch.float64)
    dist.all_reduce(stats)
    if dist.get_rank() == 0:
        torch.save({"old_vs_engine": diff, "replay_mismatch": stats[0].item(), "replay_checked": stats[1].item(),
                    "update_changed": stats[2].item(), "update_tokens": stats[3].item(),
                    "engine_route_flips": stats[4].item(), "engine_route_tokens": stats[5].item()}, out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
