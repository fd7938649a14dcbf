"""torchrun script: load converted MoE checkpoints at TP/PP/EP the way the trainer does, check every parameter equals
the HF weights (experts split over EP ranks), and re-save at this layout. argv: jobs.json tp pp ep etp"""
import json
import shutil
import sys
from pathlib import Path


def main():
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from convert_tp2pp2 import check_equals_hf
    from dapo_megatron import parallel
    from dapo_megatron.models import ModelConfig, build_model

    jobs = json.loads(Path(sys.argv[1]).read_text())
    tp, pp, ep, etp = (int(a) for a in sys.argv[2:6])
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                expert_model_parallel_size=ep, expert_tensor_parallel_size=etp))
    for job in jobs:
        root, out = Path(job["mg_root"]), Path(job["out_root"])
        model, arch = build_model(ModelConfig(path=str(root / "hf_config")))
        model_dir = root / (root / "latest").read_text().strip() / "model"
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(model_dir)), strict=True)
        check_equals_hf(model, arch, job["hf_dir"])
        new_model_dir = out / "iter_0000003" / "model"
        if dist.get_rank() == 0:
            new_model_dir.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(new_model_dir))
        if dist.get_rank() == 0:
            shutil.copytree(root / "hf_config", out / "hf_config")
            (out / "latest").write_text("iter_0000003\n")
        dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
