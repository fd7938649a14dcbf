import pytest
import torch

from dapo_megatron.algo.overlong import OverlongConfig, apply_overlong_shaping, overlong_penalty, truncation_mask
from dapo_megatron.rollout.sample import Sample


def test_penalty_hand_computed():
    # L_max = 20, L_cache = 4: free up to 16, linear from 0 to -1 over (16, 20], then -1.
    lengths = [0, 10, 16, 17, 18, 19, 20, 21, 100]
    got = overlong_penalty(lengths, max_response_length=20, overlong_buffer_len=4)
    want = torch.tensor([0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_penalty_factor_scales_and_floors():
    got = overlong_penalty(torch.tensor([16, 18, 20, 50]), 20, 4, penalty_factor=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, -0.25, -0.5, -0.5]))


def test_zero_buffer_is_a_hard_step():
    torch.testing.assert_close(overlong_penalty([19, 20, 21], 20, 0), torch.tensor([0.0, 0.0, -1.0]))


def test_buffer_longer_than_limit_is_rejected():
    with pytest.raises(ValueError, match="overlong_buffer.len"):
        overlong_penalty([1], max_response_length=8, overlong_buffer_len=9)


def test_truncation_mask():
    assert truncation_mask(["stop", "length", "abort", "stop"]).tolist() == [True, False, True, True]
    assert truncation_mask([]).dtype == torch.bool


def test_apply_shaping_adds_penalty_and_masks_truncated():
    samples = [Sample(prompt_ids=[1], response_ids=[0] * n, finish_reason=r, reward=1.0)
               for n, r in [(10, "stop"), (18, "stop"), (20, "length")]]
    apply_overlong_shaping(samples, OverlongConfig(enable=True, len=4, mask_truncated=True), 20)
    assert [s.reward for s in samples] == [1.0, 0.5, 0.0]
    assert [s.loss_mask for s in samples] == [None, None, [0] * 20]


def test_apply_shaping_disabled_penalty_still_masks():
    s = Sample(prompt_ids=[1], response_ids=[0] * 20, finish_reason="length", reward=-1.0)
    apply_overlong_shaping([s], OverlongConfig(enable=False, len=4, mask_truncated=True), 20)
    assert s.reward == -1.0 and s.loss_mask == [0] * 20


def test_config_validation():
    with pytest.raises(ValueError, match="overlong_buffer.len"):
        OverlongConfig(len=-1)
    assert OverlongConfig().len == 4096 and OverlongConfig().penalty_factor == 1.0
