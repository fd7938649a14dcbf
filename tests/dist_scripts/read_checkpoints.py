"""torchrun (1 process): dump the full tensors of several dist_checkpointing folders. argv: dir1 out1 [dir2 out2 ...]"""
import sys

import torch

if __name__ == "__main__":
    from megatron.core import dist_checkpointing

    from dapo_megatron import parallel

    parallel.initialize()
    args = sys.argv[1:]
    for ckpt_dir, out in zip(args[::2], args[1::2]):
        torch.save({k: v.clone() for k, v in dist_checkpointing.load_plain_tensors(ckpt_dir).items()
                    if torch.is_tensor(v)}, out)
    parallel.destroy()
