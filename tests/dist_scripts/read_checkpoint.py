"""torchrun (1 process): dump the full (unsharded) tensors of a dist_checkpointing folder. argv: ckpt_dir out_file"""
import sys

import torch

if __name__ == "__main__":
    from megatron.core import dist_checkpointing

    from dapo_megatron import parallel

    parallel.initialize()
    torch.save({k: v.clone() for k, v in dist_checkpointing.load_plain_tensors(sys.argv[1]).items()
                if torch.is_tensor(v)}, sys.argv[2])
    parallel.destroy()
