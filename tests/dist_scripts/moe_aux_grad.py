"""torchrun script (1 rank): the router-weight gradient of the update with zero advantages (only the MoE aux loss
trains the routers) against a hand computation of megatron's switch load-balancing loss per micro-batch, weighted
by the micro-batch's share of the step's router tokens (exact for the last MoE layer; an earlier router's gradient
also holds the later layers' aux losses through the hidden states). argv: hf_dir out_file"""
import random
import sys

import torch


def main():
    hf_dir, out_file = sys.argv[1], sys.argv[2]
    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig
    from dapo_megatron.train.routing_replay import local_routers
    from dapo_megatron.types import Sample

    parallel.initialize(parallel.ParallelConfig())
    coeff = 0.5
    actor = Actor(ModelConfig(path=hf_dir, moe_aux_loss_coeff=coeff),
                  ActorConfig(global_batch_size=4, micro_batch_size=2, lr=0.0, clip_grad=0.0), PolicyLossConfig(),
                  pad_id=0)
    rng = random.Random(0)
    samples = []
    for _ in range(4):
        prompt = [rng.randrange(1, 120) for _ in range(rng.randrange(3, 9))]
        response = [rng.randrange(1, 120) for _ in range(rng.randrange(2, 9))]
        samples.append(Sample(prompt_ids=prompt, response_ids=response, rollout_logprobs=[-1.0] * len(response),
                              metadata={"advantage": 0.0}))
    routers = local_routers(actor.model.module)
    inputs = {layer: [] for layer, _ in routers}
    for layer, r in routers:
        r.register_forward_hook(lambda _m, inp, _o, layer=layer: inputs[layer].append(inp[0].detach().clone()))
    metrics = actor.train_step(samples)
    moe = actor.arch.moe
    total = sum(h.shape[0] * h.shape[1] for h in inputs[routers[0][0]])
    err, scale, ratios = 0.0, 0.0, []
    for layer, r in routers:
        w = r.weight.detach().clone().requires_grad_(True)
        want = 0.0
        for h in inputs[layer]:
            logits = h.reshape(-1, h.shape[-1]) @ w.t()
            probs = torch.softmax(logits, dim=-1)
            top = torch.topk(probs.detach(), moe.topk, dim=1).indices
            count = torch.zeros_like(probs).scatter(1, top, 1).sum(0)
            T = logits.shape[0]
            aux = (probs.sum(0) * count).sum() * moe.num_experts * coeff / (moe.topk * T * T)
            want = want + aux * T / total
        (g,) = torch.autograd.grad(want, w)
        if layer == routers[-1][0]:  # earlier routers also get gradient from later layers' aux losses (via h)
            err = float((r.weight.main_grad - g).abs().max())
        ratios.append(float((r.weight.main_grad * g).sum() / (g * g).sum()))
        scale = max(scale, float(g.abs().max()))
    torch.save({"max_abs_err": err, "grad_scale": scale, "ratios": ratios, "total": total, "metrics": metrics}, out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
