"""torchrun script (TP*PP processes): load converted Megatron checkpoints the way the trainer does, check every
parameter equals the HF weights, save the logits, and re-save at this TP/PP like a training checkpoint.

argv: jobs.json tp pp, where jobs.json is a list of {"hf_dir", "mg_root", "out_root", "logits"}.
"""
import json
import shutil
import sys
from pathlib import Path

import torch


def pipelined_logits(model, ids, arch):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    captured = []

    def forward_step(_, m):
        def loss_func(output):
            # the real vocabulary: megatron's padded columns (make_vocab_size_divisible_by) are not HF's
            captured.append(gather_from_tensor_model_parallel_region(output)[..., :arch.vocab_size])
            return output.sum() * 0, {}

        return m(ids, pos, None), loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                                forward_only=True)
    return captured[0] if captured else None


def check_equals_hf(model, arch, hf_dir):
    from dapo_megatron.models.builder import build_gpt_model
    from dapo_megatron.models.weights import load_hf_weights, safetensors_getter
    from megatron.core import parallel_state as ps

    ref = build_gpt_model(arch, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_hf_weights(ref, arch, safetensors_getter(hf_dir))
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), f"{hf_dir}: {name} differs from the HF weights"


def main():
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from dapo_megatron import parallel
    from dapo_megatron.models import ModelConfig, build_model

    jobs, tp, pp = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]), int(sys.argv[3])
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    for job in jobs:
        root, out = Path(job["mg_root"]), Path(job["out_root"])
        model, arch = build_model(ModelConfig(path=str(root / "hf_config")))
        model_dir = root / (root / "latest").read_text().strip() / "model"
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(model_dir)), strict=True)
        model.eval()
        check_equals_hf(model, arch, job["hf_dir"])
        ids = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = pipelined_logits(model, ids, arch)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            torch.save({"ids": ids, "logits": logits}, job["logits"])
        # Re-save at this TP/PP the way the trainer does, with the trainer's extra entries beside the model.
        new_model_dir = out / "iter_0000005" / "model"
        if dist.get_rank() == 0:
            new_model_dir.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(new_model_dir))
        if dist.get_rank() == 0:
            (out / "iter_0000005" / "optim").mkdir()
            (out / "iter_0000005" / "optim" / "note.txt").write_text("optimizer state lives here")
            (out / "iter_0000005" / "trainer_state.json").write_text('{"step": 5}')
            shutil.copytree(root / "hf_config", out / "hf_config")
            (out / "latest").write_text("iter_0000005\n")
        dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
