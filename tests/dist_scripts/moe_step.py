"""torchrun script: one DAPO optimizer step of the Actor on an MoE model at the given EP; rank 0 saves every HF
tensor after the step (gathered over TP/EP by the weight-sync iterator) and the step's metrics.
argv: hf_dir ep out_file [micro_batch_size [moe_aux_loss_coeff [tp]]] (tp > 1: expert TP 1); with DAPO_DUMP_GRADS=1 the gradients the optimizer
receives are saved too (HF names, gathered like the weights)."""
import os
import random
import sys

import torch


def main():
    hf_dir, ep, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mbs = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    aux = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "None" else None
    tp = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    import torch.distributed as dist

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.rollout.sample import Sample
    from dapo_megatron.train.actor import Actor, ActorConfig

    parallel.initialize(parallel.ParallelConfig(expert_model_parallel_size=ep, tensor_model_parallel_size=tp,
                                                expert_tensor_parallel_size=1 if tp > 1 else None))
    actor = Actor(ModelConfig(path=hf_dir, moe_aux_loss_coeff=aux),
                  ActorConfig(global_batch_size=8, micro_batch_size=mbs, lr=1e-3, clip_grad=1.0), PolicyLossConfig(),
                  pad_id=0)
    grads = {}
    if os.environ.get("DAPO_DUMP_GRADS"):
        step = actor.optimizer.step

        def step_and_dump():  # the grads as HF tensors: swap them into the weights, gather, swap back
            params = [p for p in actor.model.parameters()]
            saved = [p.data.clone() for p in params]
            for p in params:
                p.data.copy_(p.main_grad)
            grads.update({k: v.clone() for k, v in actor.hf_weights()})
            for p, d in zip(params, saved):
                p.data.copy_(d)
            return step()

        actor.optimizer.step = step_and_dump
    rng = random.Random(0)
    samples = []
    for i in range(8):
        prompt = [rng.randrange(1, 128) for _ in range(rng.randrange(3, 8))]
        response = [rng.randrange(1, 128) for _ in range(rng.randrange(2, 9))]
        s = Sample(prompt_ids=prompt, response_ids=response, rollout_logprobs=[-1.0] * len(response))
        s.metadata["advantage"] = 1.0 if i % 2 else -1.0
        samples.append(s)
    actor.compute_logprobs(samples)
    metrics = actor.train_step(samples)
    weights = dict(actor.hf_weights())
    if dist.get_rank() == 0:
        torch.save({"weights": {k: v.clone() for k, v in weights.items()}, "metrics": metrics,
                    "old": [s.metadata["old_logprobs"] for s in samples],
                    "grads": grads}, out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
