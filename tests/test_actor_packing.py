"""Micro-batch layout: token balancing (deterministic, same count on every rank) and the packed / padded tensors."""
import random

import torch

from dapo_megatron.rollout.sample import Sample
from dapo_megatron.train.packing import (dp_partition, karmarkar_karp, microbatch_groups, pack_microbatch,
                                         register_token_field, to_rows, TOKEN_FIELDS)


def _sums(weights, parts):
    return sorted(sum(weights[i] for i in p) for p in parts)


def test_karmarkar_karp_balances_and_is_deterministic():
    w = [8, 7, 6, 5, 4]
    parts = karmarkar_karp(w, 2)
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3, 4]
    assert _sums(w, parts) == [14, 16]  # largest differencing (by hand: 8|7, 6|5, 4+7|8, then 11+5|8+6)
    assert parts == karmarkar_karp(list(w), 2)  # same input, same answer (no hash / set order anywhere)
    assert karmarkar_karp([5, 5, 5, 5], 2) == [[0, 3], [1, 2]]  # ties broken by index (by hand)
    assert karmarkar_karp([3], 3) == [[0], [], []]  # fewer items than parts: empty parts last
    rng = random.Random(0)
    w = [rng.randint(16, 1024) for _ in range(64)]
    sums = _sums(w, karmarkar_karp(w, 4))
    assert sums[-1] - sums[0] <= max(w) and sums[-1] - sums[0] < 0.02 * sum(w) / 4


def test_dp_partition_covers_everything_once_and_balances_tokens():
    rng = random.Random(1)
    lengths = [rng.choice([40, 60, 200, 900]) for _ in range(32)]
    parts = dp_partition(lengths, 2)
    assert parts == dp_partition(list(lengths), 2)  # every rank computes the same partition
    assert sorted(i for p in parts for i in p) == list(range(32))
    a, b = _sums(lengths, parts)
    assert b - a <= 20  # contiguous halves would differ by hundreds of tokens here
    assert dp_partition(lengths, 1) == [list(range(32))]


def test_microbatch_groups_same_count_on_every_rank_within_budget():
    per_rank = [[100, 300, 50, 700, 20], [900, 40]]
    groups = microbatch_groups(per_rank, micro_batch_size=8, budget=800, packed=True)
    assert len(groups[0]) == len(groups[1]) == 2  # rank 0 needs ceil(1170 / 800) = 2; rank 1 gets as many
    for lengths, gs in zip(per_rank, groups):
        assert sorted(i for g in gs for i in g) == list(range(len(lengths)))
        for g in gs:
            assert len(g) == 1 or sum(lengths[i] for i in g) <= 800  # 900 > budget: alone
    assert groups == microbatch_groups([list(r) for r in per_rank], micro_batch_size=8, budget=800, packed=True)
    # padded budget counts count x longest (rounded to 8): [100, 300] is 2 x 304 = 608 padded tokens
    padded = microbatch_groups([[100, 300, 50, 700]], micro_batch_size=8, budget=800, packed=False, multiple=8)
    assert all(len(g) * max(-(-[100, 300, 50, 700][i] // 8) * 8 for i in g) <= 800 for g in padded[0] if len(g) > 1)
    # count mode: at most micro_batch_size per group, consecutive, the same count everywhere (empty groups allowed)
    assert microbatch_groups([[1] * 5, [1] * 2], micro_batch_size=2) == [[[0], [1, 2], [3, 4]], [[], [0], [1]]]


def _sample(p, r, adv=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Sample(prompt_ids=list(range(10, 10 + p)), response_ids=list(range(50, 50 + r)),
                  rollout_logprobs=(-torch.rand(r, generator=g)).tolist(), metadata={"advantage": adv})


def test_packed_microbatch_layout():
    a, b = _sample(3, 2, adv=2.0), _sample(2, 3, adv=-1.0)
    a.loss_mask = [1, 0]
    mb = pack_microbatch([a, b], pad_id=0, multiple=1, packed=True)
    assert mb["tokens"].tolist() == [[10, 11, 12, 50, 51, 10, 11, 50, 51, 52]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]  # restart per sequence
    assert mb["cu_seqlens"].tolist() == [0, 5, 10] and mb["max_seqlen"] == 5
    # logits at position p-1+j predict response token j: a's at 2,3; b's at 5+1, 5+2, 5+3
    assert mb["head_index"].tolist() == [2, 3, 6, 7, 8]
    assert mb["targets"].tolist() == [50, 51, 50, 51, 52]
    assert mb["loss_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]  # response-major [B, R]
    assert mb["advantages"].tolist() == [[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]]
    assert torch.equal(mb["old_logprobs"][1], torch.tensor(b.rollout_logprobs))  # engine's when not recomputed
    flat = torch.arange(5.0)
    assert to_rows(flat, mb).tolist() == [[0, 1, 0], [2, 3, 4]]
    # padding to a multiple of 8: the tail is a sequence of its own, never a head position
    mb = pack_microbatch([a, _sample(1, 1)], pad_id=0, multiple=8, packed=True)
    assert mb["tokens"].shape == (1, 8) and mb["cu_seqlens"].tolist() == [0, 5, 7, 8]


def test_padded_microbatch_head_positions_in_megatron_order():
    a, b = _sample(3, 2), _sample(2, 3)
    mb = pack_microbatch([a, b], pad_id=0, multiple=8, packed=False)
    assert mb["tokens"].tolist() == [[10, 11, 12, 50, 51, 0, 0, 0], [10, 11, 50, 51, 52, 0, 0, 0]]
    assert mb["cu_seqlens"] is None
    # [s, b] flattened: position t of row i is t * B + i
    assert mb["head_index"].tolist() == [2 * 2 + 0, 3 * 2 + 0, 1 * 2 + 1, 2 * 2 + 1, 3 * 2 + 1]
    packed = pack_microbatch([a, b], pad_id=0, multiple=8, packed=True)
    for k in ("targets", "loss_mask", "advantages", "old_logprobs", "rollout_logprobs", "rows", "cols"):
        assert torch.equal(mb[k], packed[k]), k  # both layouts feed the loss the same [B, R] tensors


def test_per_token_fields_are_generic_and_empty_groups_are_zero_loss_dummies():
    s = _sample(2, 2)
    s.metadata["ref_logprobs"] = [-0.5, -0.25]
    register_token_field("ref_logprobs", lambda x: x.metadata.get("ref_logprobs"))
    try:
        mb = pack_microbatch([s, _sample(1, 3)], pad_id=0, multiple=8)
        assert mb["ref_logprobs"].tolist() == [[-0.5, -0.25, 0.0], [0.0, 0.0, 0.0]]  # missing: zeros
    finally:
        del TOKEN_FIELDS["ref_logprobs"]
    dummy = pack_microbatch([], pad_id=0, multiple=8)
    assert dummy["dummy"] and dummy["loss_mask"].sum() == 0 and dummy["head_index"].numel() == 1


def test_recompute_settings_are_checked_and_map_to_transformer_config():
    import pytest

    from dapo_megatron.train.actor import ActorConfig

    assert ActorConfig().transformer_overrides() == {}
    assert ActorConfig(recompute_granularity="selective").transformer_overrides() == {
        "recompute_granularity": "selective", "recompute_method": None, "recompute_num_layers": None}
    full = ActorConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    assert full.transformer_overrides()["recompute_num_layers"] == 2
    with pytest.raises(ValueError, match="actor.recompute_granularity='layer'"):
        ActorConfig(recompute_granularity="layer")
    with pytest.raises(ValueError, match="actor.recompute_method"):
        ActorConfig(recompute_granularity="full")
    with pytest.raises(ValueError, match="only with actor.recompute_granularity=full"):
        ActorConfig(recompute_num_layers=2)
