"""`dapo-megatron train ARGS` on this rank, recording what each step's train_on_batch received (test_rollout_dumps).

argv: OUT_JSON then the train overrides. The recorder wraps the loop's train_on_batch, so the record is what the
trainer trained on, written independently of the rollout dumps it is compared with."""
import json
import sys

from dapo_megatron import cli
from dapo_megatron.train import loop

SEEN = []


def recording(actor, batch, _inner=loop.train_on_batch):
    SEEN.append([{"group_id": s.group_id, "index": s.index, "prompt_ids": s.prompt_ids,
                  "response_ids": s.response_ids, "rollout_logprobs": s.rollout_logprobs,
                  "old_logprobs": s.metadata.get("old_logprobs"), "loss_mask": s.loss_mask,
                  "advantage": s.metadata.get("advantage")} for s in batch])
    return _inner(actor, batch)


if __name__ == "__main__":  # the verifier pool's spawned workers import this file again
    loop.train_on_batch = recording
    try:
        cli.main(["train", *sys.argv[2:]])
    except SystemExit:  # main() always exits: keep what was seen, then exit with its code
        with open(sys.argv[1], "w") as f:
            json.dump(SEEN, f)
        raise
