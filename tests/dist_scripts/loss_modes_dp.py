"""torchrun, world 1 or 2 (gloo): one optimizer step of the real Actor for every loss mode; saves grads and weights.

Run at world 1 (DP=1) and world 2 (DP=2) on the same samples; tests/test_loss_modes_dp.py compares the files.
Each mode also exercises its own aggregation mode, rollout correction and (for one) the KL term, so the
global-count normalisation of every path is checked through megatron's DDP. Adam's eps is 1 so that the update is
smooth in the gradient (at eps 1e-8 the first Adam step is sign(g), which would amplify round-off on tiny grads).
"""
import sys

import torch
import torch.distributed as dist

from dapo_megatron import parallel
from dapo_megatron.algo.loss import PolicyLossConfig
from dapo_megatron.models import ModelConfig
from dapo_megatron.rollout.sample import Sample
from dapo_megatron.train.actor import Actor, ActorConfig

MODES = {
    "vanilla": dict(loss_mode="vanilla", loss_agg_mode="token-mean", tis_cap=1.5),
    "gspo": dict(loss_mode="gspo", clip_ratio_c=None, loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.05,
                 clip_ratio_high=0.05, rollout_correction={"level": "sequence", "mode": "mask", "threshold": 1.3}),
    "cispo": dict(loss_mode="cispo", clip_ratio_c=None, loss_agg_mode="seq-mean-token-sum", kl_coef=0.1),
}


def make_samples(vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        p, r = 3 + i % 3, 2 + (5 * i) % 7  # different lengths: padding and several token counts per micro-batch
        mask = [1] * r if i != 5 else [0] * r  # one fully masked (overlong-filtered) response
        if i == 2:
            mask[0] = 0
        samples.append(Sample(prompt_ids=torch.randint(1, vocab, (p,), generator=g).tolist(),
                              response_ids=torch.randint(1, vocab, (r,), generator=g).tolist(),
                              rollout_logprobs=[0.0] * r, loss_mask=mask, group_id=i // 4, index=i % 4,
                              metadata={"advantage": float(torch.randn((), generator=g))}))
    return samples


def perturb(samples, key, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return [[v + scale * float(torch.randn((), generator=g)) for v in s.metadata["cur"]] for s in samples]


def main(hf_dir: str, out: str):
    parallel.initialize(parallel.ParallelConfig(), seed=1)
    world = dist.get_world_size()
    results = {}
    for name, kw in MODES.items():
        cfg = PolicyLossConfig(**kw)
        actor = Actor(ModelConfig(path=hf_dir), ActorConfig(global_batch_size=8, micro_batch_size=2, lr=0.01,
                                                            adam_eps=1.0, clip_grad=0.0), cfg, pad_id=0)
        samples = make_samples(actor.arch.vocab_size)
        actor.compute_logprobs(samples, key="cur")
        # old, engine and reference policies off the current one, so that clips, masks and the KL all act
        for s, old, roll, ref in zip(samples, perturb(samples, "cur", 0.3, 1), perturb(samples, "cur", 0.5, 2),
                                     perturb(samples, "cur", 0.2, 3)):
            s.metadata["old_logprobs"] = old
            s.rollout_logprobs = roll
            if cfg.kl_coef:
                s.metadata["ref_logprobs"] = ref
        metrics = actor.train_step(samples)
        module = actor.model.module
        results[name] = {"metrics": metrics,
                         "grads": {n: p.main_grad.detach().clone() for n, p in module.named_parameters()},
                         "weights": {n: p.detach().clone() for n, p in module.named_parameters()}}
        if dist.get_rank() == 0:
            print(f"world {world} {name}: " + " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())),
                  flush=True)
    if dist.get_rank() == 0:
        torch.save(results, out)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
