import pytest
import torch

from dapo_megatron.algo.advantages import broadcast_to_tokens, compute_group_advantages


def test_group_normalised_with_unbiased_std():
    # group [1, 0, 0, 0]: mean 0.25, deviations (0.75, -0.25, -0.25, -0.25), sum of squares 0.75,
    # unbiased var 0.75 / 3 = 0.25 -> std 0.5 -> A = (1.5, -0.5, -0.5, -0.5). (Biased std would give 1.732.)
    # group [1, 0, 0, 1]: mean 0.5, deviations +-0.5, var 1 / 3 -> std 0.57735 -> A = +-0.866025.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    adv = compute_group_advantages(rewards, group_size=4)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.866025, -0.866025, -0.866025, 0.866025])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape


def test_eps_is_added_to_the_std():
    # group [2, 0]: mean 1, deviations +-1, unbiased std sqrt(2); eps = 0.5 -> A = +-1 / (1.414214 + 0.5)
    adv = compute_group_advantages(torch.tensor([2.0, 0.0]), group_size=2, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([0.522408, -0.522408]), atol=1e-6, rtol=0)


def test_no_std_normalisation_is_plain_centring():
    # Dr. GRPO: [1, 0, 0, 0] - 0.25
    adv = compute_group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]), atol=1e-7, rtol=0)


def test_leave_one_out_baseline():
    # [1, 0, 0, 0]: baseline of response 0 = mean(0, 0, 0) = 0 -> 1; of the others = mean(1, 0, 0) = 1/3 -> -1/3
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = compute_group_advantages(rewards, group_size=4, norm_by_std=False, leave_one_out=True)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]), atol=1e-6, rtol=0)
    # with std: divided by the whole group's std 0.5 -> (2, -2/3, -2/3, -2/3)
    adv = compute_group_advantages(rewards, group_size=4, leave_one_out=True)
    torch.testing.assert_close(adv, torch.tensor([2.0, -2 / 3, -2 / 3, -2 / 3]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("norm_by_std", [False, True])
def test_all_equal_group_gives_exactly_zero(norm_by_std, leave_one_out):
    # 16 x 0.7 in float32: x - x.mean() is 6e-8, which the std division would blow up to 0.056.
    rewards = torch.cat([torch.full((16,), 0.7), torch.tensor([1.0] + [0.0] * 15)])
    adv = compute_group_advantages(rewards, 16, norm_by_std=norm_by_std, leave_one_out=leave_one_out)
    assert torch.equal(adv[:16], torch.zeros(16))
    assert adv[16] > 0 and (adv[17:] < 0).all()


def test_groups_are_independent():
    # group 1 is group 0 shifted by +10 and scaled by 3: normalised advantages are identical
    g0 = torch.tensor([0.5, 1.0, 0.0])
    adv = compute_group_advantages(torch.cat([g0, 10 + 3 * g0]), group_size=3, eps=0.0)
    torch.testing.assert_close(adv[:3], adv[3:], atol=1e-5, rtol=0)
    # [0.5, 1, 0]: mean 0.5, deviations (0, 0.5, -0.5), unbiased std 0.5 -> (0, 1, -1)
    torch.testing.assert_close(adv[:3], torch.tensor([0.0, 1.0, -1.0]), atol=1e-6, rtol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        compute_group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        compute_group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="1-D"):
        compute_group_advantages(torch.zeros(2, 4), group_size=4)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="expected advantages"):
        broadcast_to_tokens(torch.tensor([2.0]), mask)
