"""torchrun script: load an HF checkpoint into megatron GPTModel at the current TP/PP, run a pipelined forward,
save the full-vocab logits from the last stage. argv: hf_dir tp pp out_file"""
import os
import sys

import torch


def main():
    hf_dir, tp, pp, out_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from dapo_megatron import parallel
    from dapo_megatron.models import ModelConfig, build_model
    from dapo_megatron.models.weights import iter_hf_weights, load_hf_weights, safetensors_getter

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    model, arch = build_model(ModelConfig(path=hf_dir, fp8=os.environ.get("DAPO_FP8") or None))
    load_hf_weights(model, arch, safetensors_getter(hf_dir))
    # Weight sync's view (TP-gathered, padding stripped) is the HF checkpoint, bit for bit.
    get_hf = safetensors_getter(hf_dir)
    for name, tensor in iter_hf_weights(model, arch):
        assert tensor.shape == get_hf(name).shape and torch.equal(tensor.cpu(), get_hf(name)), name
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (2, 32), generator=gen).to(next(model.parameters()).device)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    captured = []

    def forward_step(data_iter, m):
        out = m(ids, pos, None)

        def loss_func(output):
            # the real vocabulary: megatron's padded columns (make_vocab_size_divisible_by) are not HF's
            captured.append(gather_from_tensor_model_parallel_region(output)[..., :arch.vocab_size])
            # log-sum-exp of the vocab-parallel logits: a loss whose gradient reaches every parameter
            return gather_from_tensor_model_parallel_region(output).logsumexp(-1).mean(), {}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True)
    # A training step through the same schedule: every parameter of every stage gets a finite gradient.
    model.train()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=False)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"bad gradient for {name}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters()), "all gradients are zero"
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"ids": ids, "logits": captured[0].detach()}, out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
