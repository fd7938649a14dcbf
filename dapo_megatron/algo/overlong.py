"""DAPO overlong reward shaping: soft punishment inside a buffer before the length limit, and the
overlong filter that masks truncated responses out of the loss."""
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class OverlongConfig:
    """`overlong_buffer` section (verl names): `len` is L_cache, the buffer before max_response_length."""

    enable: bool = False  # add the soft punishment to the reward (DAPO: true; off unless asked for)
    len: int = 4096
    penalty_factor: float = 1.0
    mask_truncated: bool = False  # overlong filtering: finish_reason == "length" -> zero loss mask

    def __post_init__(self):
        if self.len < 0:
            raise ValueError(f"overlong_buffer.len={self.len} must be >= 0")
        if self.penalty_factor < 0:
            raise ValueError(f"overlong_buffer.penalty_factor={self.penalty_factor} must be >= 0")


def overlong_penalty(response_lengths, max_response_length: int, overlong_buffer_len: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """R_len(y) = 0 if |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache * factor inside the
    buffer; -factor at and beyond L_max (never below)."""
    if not 0 <= overlong_buffer_len <= max_response_length:
        raise ValueError(f"overlong_buffer.len={overlong_buffer_len} must lie in [0, max_response_length="
                         f"{max_response_length}]")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float64)
    expected = max_response_length - overlong_buffer_len
    if overlong_buffer_len == 0:  # no buffer: a hard step at L_max
        penalty = torch.where(lengths > max_response_length, -1.0, 0.0).to(torch.float64)
    else:
        penalty = ((expected - lengths) / overlong_buffer_len).clamp(min=-1.0, max=0.0)
    return (penalty * penalty_factor).to(torch.float32)


def truncation_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """True = keep in the loss; False for responses cut by the length limit."""
    return torch.tensor([reason != "length" for reason in finish_reasons], dtype=torch.bool)


def apply_overlong_shaping(samples, cfg: OverlongConfig, max_response_length: int) -> None:
    """In place on Samples: add the length penalty to `reward`; zero the loss mask of truncated ones."""
    if not samples:
        return
    if cfg.enable:
        penalty = overlong_penalty([s.response_length for s in samples], max_response_length, cfg.len,
                                   cfg.penalty_factor)
        for s, p in zip(samples, penalty.tolist()):
            s.reward += p
            s.metadata["overlong_penalty"] = p
    if cfg.mask_truncated:
        for s, keep in zip(samples, truncation_mask([s.finish_reason for s in samples]).tolist()):
            if not keep:
                s.loss_mask = [0] * s.response_length
