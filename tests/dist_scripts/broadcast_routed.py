"""torchrun script (2 ranks): broadcast_samples carries Sample.routed_experts (as an int32 tensor) to rank 1.
argv: out_file"""
import sys


def main():
    import torch
    import torch.distributed as dist

    from dapo_megatron.train.routing_replay import encode_routed_experts
    from dapo_megatron.train.weight_stream import broadcast_samples
    from dapo_megatron.types import Sample

    dist.init_process_group("gloo")
    samples = None
    if dist.get_rank() == 0:
        t = torch.arange(5 * 4 * 2, dtype=torch.int32).reshape(5, 4, 2)
        samples = [Sample(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6], rollout_logprobs=[-1.0] * 3,
                          routed_experts=encode_routed_experts(t)),
                   Sample(prompt_ids=[7], response_ids=[8], rollout_logprobs=[-2.0])]
    got = broadcast_samples(samples, src=0)
    if dist.get_rank() == 1:
        torch.save([(s.prompt_ids, s.response_ids, s.routed_experts) for s in got], sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
