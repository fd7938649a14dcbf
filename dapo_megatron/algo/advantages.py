"""Group-relative advantages (GRPO / DAPO): every response is scored against the other responses to its prompt.

A_i = (R_i - mean_g R) / (std_g R + eps), with R the scalar rewards of the G responses of one prompt group.
Every token of a response gets its response's advantage (`broadcast_to_tokens`).

Std convention: the *unbiased* (Bessel-corrected, divide by G - 1) standard deviation, i.e. `torch.std`'s default,
as verl's GRPO estimator does, so that advantages (and loss curves) are directly comparable with verl/DAPO runs.
For binary rewards with G = 16 the two conventions differ by a factor sqrt(16/15) ~ 1.03 only.
"""
from torch import Tensor


def compute_group_advantages(
    rewards: Tensor,
    group_size: int,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    leave_one_out: bool = False,
) -> Tensor:
    """Per-response advantages from flat rewards laid out group after group.

    Args:
        rewards: [num_groups * group_size], the G responses of group 0 first, then group 1, ...
        group_size: G (`n_samples_per_prompt`), at least 2.
        eps: added to the std so that a group with tiny spread does not explode.
        norm_by_std: divide by the group std (GRPO/DAPO). False gives Dr. GRPO's plain centring R_i - baseline.
        leave_one_out: baseline is the mean of the *other* G - 1 rewards (RLOO) instead of the whole group's mean;
            this scales the centred reward by G / (G - 1). The std (if used) is still the whole group's.

    Returns:
        float32 tensor of the same shape as `rewards`. A group whose rewards are all equal gets exactly 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size} "
                         "(raise n_samples_per_prompt)")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")

    grouped = rewards.float().view(-1, group_size)
    # Centre on each group's first reward before averaging: an all-equal group then gives exact zeros
    # (a float mean of equal values need not equal them) and the subtraction loses no precision.
    shifted = grouped - grouped[:, :1]
    if leave_one_out:
        baseline = (shifted.sum(dim=1, keepdim=True) - shifted) / (group_size - 1)
    else:
        baseline = shifted.mean(dim=1, keepdim=True)
    advantages = shifted - baseline
    if norm_by_std:
        advantages = advantages / (shifted.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(rewards.shape)


def broadcast_to_tokens(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Give every token of response i the advantage of response i: [N] x [N, T] -> [N, T], 0 where the mask is 0."""
    if advantages.dim() != 1 or loss_mask.dim() != 2 or advantages.shape[0] != loss_mask.shape[0]:
        raise ValueError(f"expected advantages [N] and loss_mask [N, T], got {tuple(advantages.shape)} "
                         f"and {tuple(loss_mask.shape)}")
    return advantages.unsqueeze(-1) * loss_mask.to(advantages.dtype)
