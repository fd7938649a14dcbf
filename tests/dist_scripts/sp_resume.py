"""torchrun script (1 process, TP=1, no SP): resume the checkpoint sp_actor.py saved at TP=2 with sequence
parallelism, and redo what it recorded after saving (log-probs, one more optimizer step).

argv: hf_dir ckpt_dir out_file. The saving run padded the vocabulary with make_vocab_size_divisible_by=1 at TP=2;
here 2 at TP=1 gives the same padded rows, so the checkpoint loads as saved.
"""
import sys

import torch

from tests.dist_scripts.actor_layouts import samples
from tests.dist_scripts.sp_actor import BATCH, after_step


def main():
    hf_dir, ckpt, out_file = sys.argv[1:4]
    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig
    from dapo_megatron.train.checkpoint import find_latest, load_checkpoint

    parallel.initialize(parallel.ParallelConfig(), seed=1)
    cfg = ActorConfig(global_batch_size=BATCH, micro_batch_size=3, lr=1e-4, weight_decay=0.0, pad_to_multiple_of=1)
    actor = Actor(ModelConfig(path=hf_dir, make_vocab_size_divisible_by=2), cfg,
                  PolicyLossConfig(clip_ratio_c=3.0, entropy_coef=0.01), pad_id=0, load_hf=False)
    assert not actor.config.sequence_parallel
    load_checkpoint(find_latest(ckpt), actor)
    batch = samples(actor.arch.vocab_size)[:BATCH]
    torch.save(after_step(actor, batch), out_file)
    parallel.destroy()


if __name__ == "__main__":
    main()
