"""Rollout correction: importance weights between the trainer's old policy and the engine that sampled.

The engine samples with other kernels (and, with async rollout, other weights) than the trainer, so
w = pi_old_trainer / pi_rollout_engine differs from 1. The weight multiplies each token's policy-gradient loss:

  level=token     w_t = exp(old_t - rollout_t)
  level=sequence  w_i = exp(mean_t (old_t - rollout_t)), the geometric mean of the sequence's token weights,
                  given to every token of sequence i
  mode=truncate   (TIS) w <- min(w, threshold)
  mode=mask       (MIS) w <- w if threshold_low <= w <= threshold else 0: the token (or whole sequence) drops out
                  of the policy gradient. The normaliser is not changed (it is fixed for the whole step before any
                  backward), so a masked token counts like a token with zero advantage.

Weights are detached; KL and entropy terms are not weighted. Means run over loss tokens only (loss_mask > 0).

Contract with asynchronous rollouts (mixed weight versions in one batch): the clip anchor (old policy) is the
trainer's recompute at the version the step starts from (actor.recompute_old_logprobs=true); the behaviour policy,
the engine's per-token log-probs under their own versions, weights the loss through algorithm.rollout_correction
(TIS/MIS, token or sequence), as in AReaL's decoupled PPO. A token's loss is the policy loss of r = pi_theta /
pi_old (clipped by loss_mode) times w = pi_old / pi_behaviour (tests/test_decoupled_correction.py, by numbers).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")
_MAX_LOG_W = 20.0  # exp overflow guard; such a weight is far past any threshold anyway


@dataclass
class RolloutCorrectionConfig:
    level: Optional[str] = None  # null (off) | token | sequence (geometric mean over the response)
    mode: str = "truncate"  # truncate (TIS: min(w, threshold)) | mask (MIS: w = 0 outside the bounds)
    threshold: Optional[float] = None  # upper bound of w (> 1 typical: 2.0); required when level is set
    threshold_low: Optional[float] = None  # mode=mask only: also mask w < threshold_low (e.g. 0.5)

    def __post_init__(self):
        if self.level is None:
            if self.threshold is not None or self.threshold_low is not None:
                raise ValueError("rollout_correction.threshold is set but rollout_correction.level is null: "
                                 "set level to token or sequence")
            return
        if self.level not in LEVELS:
            raise ValueError(f"rollout_correction.level={self.level!r}; use token, sequence or null")
        if self.mode not in MODES:
            raise ValueError(f"rollout_correction.mode={self.mode!r}; use truncate or mask")
        if self.threshold is None or not self.threshold > 0.0:
            raise ValueError(f"rollout_correction.threshold={self.threshold} must be > 0 when level is set")
        if self.threshold_low is not None:
            if self.mode != "mask":
                raise ValueError("rollout_correction.threshold_low applies to mode=mask only")
            if not 0.0 < self.threshold_low < self.threshold:
                raise ValueError(f"rollout_correction.threshold_low={self.threshold_low} must be in (0, threshold)")

    @property
    def enabled(self) -> bool:
        return self.level is not None


def rollout_correction_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                               cfg: RolloutCorrectionConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached [N, T] weights for the policy-gradient loss, and metrics (means over loss tokens/sequences).

    Metrics: `rollout_corr_weight` (mean applied weight), `rollout_corr_{truncated|masked}_token_frac` (loss tokens
    where the bound acted) and, at sequence level, `rollout_corr_{...}_seq_frac` (sequences where it acted).
    """
    mask = mask.to(old_logprobs.dtype)
    on = mask > 0
    log_w = torch.where(on, old_logprobs.detach() - rollout_logprobs.detach(), torch.zeros_like(old_logprobs))
    if cfg.level == "sequence":
        n = mask.sum(-1, keepdim=True)
        log_w = ((log_w * mask).sum(-1, keepdim=True) / n.clamp(min=1)).expand_as(mask)
    w = torch.exp(log_w.clamp(-_MAX_LOG_W, _MAX_LOG_W))
    if cfg.mode == "truncate":
        acted = w > cfg.threshold
        w = w.clamp(max=cfg.threshold)
    else:
        acted = w > cfg.threshold
        if cfg.threshold_low is not None:
            acted = acted | (w < cfg.threshold_low)
        w = torch.where(acted, torch.zeros_like(w), w)
    w = torch.where(on, w, torch.zeros_like(w))
    verb = "truncated" if cfg.mode == "truncate" else "masked"
    ntok = mask.sum().clamp(min=1)
    metrics = {"rollout_corr_weight": (w * mask).sum() / ntok,
               f"rollout_corr_{verb}_token_frac": (acted.to(mask.dtype) * mask).sum() / ntok}
    if cfg.level == "sequence":
        has = mask.sum(-1) > 0
        metrics[f"rollout_corr_{verb}_seq_frac"] = (acted[:, 0] & has).sum().to(mask.dtype) / has.sum().clamp(min=1)
    return w.detach(), {k: v.detach() for k, v in metrics.items()}
