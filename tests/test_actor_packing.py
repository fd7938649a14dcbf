"""Micro-batch assembly: token-budget packing and the shifted target / loss-mask layout."""
import torch

from dapo_megatron.rollout.sample import Sample
from dapo_megatron.train.actor import pack_microbatch, split_by_token_budget


def test_split_by_token_budget_keeps_order_and_budget():
    # padded sizes with multiple 8: [8, 16, 8, 24, 8]; budget 32 padded tokens per micro-batch
    assert split_by_token_budget([5, 9, 3, 20, 2], budget=32, multiple=8) == [[0, 1], [2], [3], [4]]
    assert split_by_token_budget([4, 4, 4, 4], budget=32, multiple=8) == [[0, 1, 2, 3]]
    assert split_by_token_budget([50, 3], budget=32, multiple=8) == [[0], [1]]  # too long: alone


def test_pack_microbatch_aligns_logits_with_response_tokens():
    s = Sample(prompt_ids=[10, 11, 12], response_ids=[20, 21], rollout_logprobs=[-0.5, -0.25],
               loss_mask=[1, 0], metadata={"advantage": 2.0})
    mb = pack_microbatch([s], pad_id=0, multiple=8)
    assert mb["tokens"].tolist() == [[10, 11, 12, 20, 21, 0, 0, 0]]
    # position t predicts token t+1: response tokens are predicted at positions 2 and 3
    assert mb["targets"][0, 2:4].tolist() == [20, 21]
    assert mb["loss_mask"].tolist() == [[0, 0, 1, 0, 0, 0, 0, 0]]  # the sample's own mask is respected
    assert mb["advantages"][0].tolist() == [0, 0, 2.0, 2.0, 0, 0, 0, 0]
    assert torch.equal(mb["old_logprobs"][0, 2:4], torch.tensor([-0.5, -0.25]))  # engine's when not recomputed
