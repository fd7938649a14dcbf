"""torchrun script: load an HF MoE checkpoint at TP/PP/EP, run a pipelined forward and a backward, check that
iter_hf_weights gives back every HF tensor bit for bit (the weight sync's source), save last-stage logits.
argv: hf_dir tp pp ep etp out_file"""
import sys

import torch


def main():
    hf_dir, out_file = sys.argv[1], sys.argv[6]
    tp, pp, ep, etp = (int(a) for a in sys.argv[2:6])
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from dapo_megatron import parallel
    from dapo_megatron.models import ModelConfig, build_model
    from dapo_megatron.models.hf_io import HFCheckpointReader
    from dapo_megatron.models.weights import iter_hf_weights, load_hf_weights, safetensors_getter

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                expert_model_parallel_size=ep, expert_tensor_parallel_size=etp))
    model, arch = build_model(ModelConfig(path=hf_dir))
    load_hf_weights(model, arch, safetensors_getter(hf_dir))
    n_local = {len(m.local_expert_indices) for m in model.modules() if hasattr(m, "local_expert_indices")}
    assert n_local == {arch.moe.num_experts // ep}, f"local experts {n_local} at EP={ep}"

    reader = HFCheckpointReader(hf_dir)
    synced = dict(iter_hf_weights(model, arch))
    stage_layers = {int(n.split(".")[2]) for n in synced if n.startswith("model.layers.")}
    want = {n for n in reader.names if not n.startswith("model.layers.") or int(n.split(".")[2]) in stage_layers}
    want -= {n for n in want if n in ("model.embed_tokens.weight",) and not parallel_state.is_pipeline_first_stage()}
    want -= {n for n in want if n in ("model.norm.weight", "lm_head.weight")
             and not parallel_state.is_pipeline_last_stage()}
    assert set(synced) == want, f"weight sync names differ: {sorted(set(synced) ^ want)[:4]}"
    for n, t in synced.items():
        assert torch.equal(t, reader.get(n)), f"weight sync of {n} differs from the checkpoint"

    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (2, 32), generator=gen)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    captured = []

    def forward_step(data_iter, m):
        out = m(ids, pos, None)

        def loss_func(output):
            full = gather_from_tensor_model_parallel_region(output)
            captured.append(full[..., :arch.vocab_size])  # megatron's padded columns are not HF's
            return full.logsumexp(-1).mean(), {}

        return out, loss_func

    run = dict(forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
               seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
    get_forward_backward_func()(forward_only=True, **run)
    model.train()
    get_forward_backward_func()(forward_only=False, **{**run, "data_iterator": iter([None])})
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"bad gradient for {name}"
    if (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        torch.save({"ids": ids, "logits": captured[0].detach()}, out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
