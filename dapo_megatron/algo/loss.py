"""Policy losses (vanilla PPO with Clip-Higher and dual-clip, GSPO, CISPO), aggregation modes, KL, entropy bonus
and rollout correction (TIS / MIS, see rollout_correction.py).

Normalisation contract ("global-sum normalised"): `policy_loss` returns one micro-batch's *share* of the loss of
the whole optimizer step. Summing the returned losses over all micro-batches and all data-parallel ranks gives
exactly the loss of the global batch, hence the same gradient as one big batch, provided that
  * the caller passes `global_token_count` / `global_seq_count` = counts over the whole step (all micro-batches,
    all DP ranks; see `count_loss_tokens` / `count_loss_seqs`), summed before any backward;
  * micro-batch losses are summed (backward on each, no division by the number of micro-batches);
  * the DP gradient reduction is a SUM. Megatron's DDP *averages* over the data-parallel group, so the caller
    multiplies the loss by `dp_size` before backward (or configures DDP to sum).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from .rollout_correction import RolloutCorrectionConfig, rollout_correction_weights

# exp() of a float32 log-ratio overflows above ~88; clamping at 20 only touches tokens whose ratio is far outside
# any clip range (their clip binds anyway, or the run has already diverged).
_MAX_LOG_RATIO = 20.0

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


# ---------------------------------------------------------------------------------------------- aggregation modes

AggFn = Callable[..., Tensor]
LOSS_AGG_MODES: dict[str, AggFn] = {}


def register_agg_mode(name: str, *, needs_norm_length: bool = False) -> Callable[[AggFn], AggFn]:
    """Register a loss aggregation `fn(loss_mat, loss_mask, token_count, seq_count, norm_length) -> scalar`.

    `needs_norm_length`: it divides by the constant `loss_scale_factor` (validation refuses the mode without one)."""
    def decorate(fn: AggFn) -> AggFn:
        fn.needs_norm_length = needs_norm_length
        LOSS_AGG_MODES[name] = fn
        return fn
    return decorate


def count_loss_tokens(loss_mask: Tensor) -> Tensor:
    """Unmasked tokens: sum this over micro-batches and DP ranks to get `global_token_count`."""
    return loss_mask.sum()


def count_loss_seqs(loss_mask: Tensor) -> Tensor:
    """Sequences with at least one unmasked token (fully masked ones, e.g. overlong-filtered, do not count)."""
    return (loss_mask.sum(dim=-1) > 0).sum()


@register_agg_mode("token-mean")
def _token_mean(loss_mat, loss_mask, token_count, seq_count, norm_length):
    """DAPO: every token of the global batch weighs the same."""
    return (loss_mat * loss_mask).sum() / token_count


@register_agg_mode("token-sum")
def _token_sum(loss_mat, loss_mask, token_count, seq_count, norm_length):
    return (loss_mat * loss_mask).sum()


@register_agg_mode("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat, loss_mask, token_count, seq_count, norm_length):
    """GRPO: mean over each response's tokens, then mean over responses."""
    seq_tokens = loss_mask.sum(dim=-1)
    seq_losses = (loss_mat * loss_mask).sum(dim=-1) / seq_tokens.clamp(min=1)
    return seq_losses.sum() / seq_count


@register_agg_mode("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat, loss_mask, token_count, seq_count, norm_length):
    return (loss_mat * loss_mask).sum() / seq_count


@register_agg_mode("seq-mean-token-sum-norm", needs_norm_length=True)
def _seq_mean_token_sum_norm(loss_mat, loss_mask, token_count, seq_count, norm_length):
    """Dr. GRPO: token sums divided by a constant length (not the response's own), then mean over responses."""
    if norm_length is None:
        raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' needs loss_scale_factor "
                         "(the constant divisor, e.g. max_response_length)")
    return (loss_mat * loss_mask).sum() / (seq_count * norm_length)


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, mode: str, global_token_count=None, global_seq_count=None,
             norm_length: Optional[int] = None) -> Tensor:
    """Reduce a per-token [N, T] loss to this micro-batch's share of the global-batch loss (see module docstring).

    A count of None means "this micro-batch is the whole batch" and uses its own count. Counts are clamped to >= 1
    so that a fully masked micro-batch contributes 0, not NaN.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {sorted(LOSS_AGG_MODES)}")
    mask = loss_mask.to(loss_mat.dtype)
    token_count = count_loss_tokens(mask) if global_token_count is None else global_token_count
    seq_count = count_loss_seqs(mask) if global_seq_count is None else global_seq_count
    token_count = torch.as_tensor(token_count, dtype=loss_mat.dtype, device=loss_mat.device).clamp(min=1)
    seq_count = torch.as_tensor(seq_count, dtype=loss_mat.dtype, device=loss_mat.device).clamp(min=1)
    return LOSS_AGG_MODES[mode](loss_mat, mask, token_count, seq_count, norm_length)


# ---------------------------------------------------------------------------------------------------- config

@dataclass
class PolicyLossConfig:
    """Policy loss options (verl names). Ratios r = exp(logprobs - old_logprobs)."""
    loss_mode: str = "vanilla"  # vanilla (PPO clip, DAPO) | gspo (sequence ratio) | cispo (clipped IS weight)
    clip_ratio_low: float = 0.2  # clip r below 1 - clip_ratio_low (GSPO paper: 3e-4; 1.0: no lower bound, CISPO's)
    clip_ratio_high: float = 0.28  # DAPO Clip-Higher: clip r above 1 + clip_ratio_high (GSPO paper: 4e-4)
    clip_ratio_c: Optional[float] = 3.0  # dual-clip (vanilla only; null with gspo/cispo): A < 0 loss capped at -c A
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: Optional[int] = None  # Dr. GRPO's constant length for seq-mean-token-sum-norm
    kl_coef: float = 0.0  # KL to the frozen reference policy (DAPO: off); > 0 builds the reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3 (alias: low_var_kl)
    use_kl_in_reward: bool = False  # True: kl_coef * sum_t KL goes into each response's reward, not the loss
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * agg(entropy)
    tis_cap: Optional[float] = None  # shorthand for rollout_correction {level: token, mode: truncate, threshold}
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    # Where a missing loss_scale_factor comes from later, if anywhere (config.AlgorithmConfig fills it in validate):
    # then an aggregation mode that needs one does not refuse it missing here.
    loss_scale_factor_default: ClassVar[Optional[str]] = None

    def __post_init__(self):
        if isinstance(self.rollout_correction, dict):
            self.rollout_correction = RolloutCorrectionConfig(**self.rollout_correction)
        if self.loss_mode not in POLICY_LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {sorted(POLICY_LOSS_MODES)}, got {self.loss_mode!r}")
        if not 0.0 <= self.clip_ratio_low <= 1.0:  # 1.0: the lower bound 0 never binds (MiniMax-M1's CISPO setting)
            raise ValueError(f"clip_ratio_low must be in [0, 1], got {self.clip_ratio_low}")
        if not self.clip_ratio_high >= 0.0:
            raise ValueError(f"clip_ratio_high must be >= 0, got {self.clip_ratio_high}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (or null to disable dual-clip), got {self.clip_ratio_c}")
        if self.clip_ratio_c is not None and not POLICY_LOSS_MODES[self.loss_mode].dual_clip:
            raise ValueError(f"clip_ratio_c (dual-clip) applies to loss_mode=vanilla only; with "
                             f"loss_mode={self.loss_mode} set clip_ratio_c: null")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {sorted(LOSS_AGG_MODES)}, got {self.loss_agg_mode!r}")
        if self.loss_scale_factor is not None and not self.loss_scale_factor > 0:
            raise ValueError(f"loss_scale_factor must be > 0, got {self.loss_scale_factor}")
        if (LOSS_AGG_MODES[self.loss_agg_mode].needs_norm_length and self.loss_scale_factor is None
                and self.loss_scale_factor_default is None):
            raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r} needs loss_scale_factor: set it to the "
                             "constant divisor (Dr. GRPO uses max_response_length)")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {list(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.use_kl_in_reward and self.kl_coef == 0.0:
            raise ValueError("use_kl_in_reward=true needs kl_coef > 0 (the KL penalty's weight in the reward)")
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"entropy_coef must be a finite number, got {self.entropy_coef}")
        if self.tis_cap is not None:
            if not self.tis_cap > 0.0:
                raise ValueError(f"tis_cap must be > 0 (or null to disable TIS), got {self.tis_cap}")
            tis = RolloutCorrectionConfig(level="token", mode="truncate", threshold=self.tis_cap)
            if self.rollout_correction.enabled and self.rollout_correction != tis:
                raise ValueError("tis_cap and rollout_correction are both set; tis_cap=C means rollout_correction "
                                 "{level: token, mode: truncate, threshold: C}: keep one")
            self.rollout_correction = tis

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_coef != 0.0 and not self.use_kl_in_reward

    @property
    def needs_reference(self) -> bool:
        """A reference policy is built only when some term uses its log-probs."""
        return self.kl_coef != 0.0


# --------------------------------------------------------------------------------------------- token losses

def _log_ratio(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """a - b on unmasked tokens, 0 on padding (whose log-probs may be garbage and must not overflow exp)."""
    return torch.where(mask > 0, a - b, torch.zeros_like(a)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def clipped_pg_loss(ratio: Tensor, advantages: Tensor, cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO loss -min(r A, clip(r, 1 - low, 1 + high) A), optionally capped at -c A for A < 0.

    Where a clip binds the token loss is a constant (gradient exactly 0); on a boundary (r == 1 + high,
    r == 1 - low, r == c) it does not bind. Returns the loss and the boolean masks of where each clip binds.
    """
    loss = -advantages * ratio
    clip_high = (advantages > 0) & (ratio > 1.0 + cfg.clip_ratio_high)
    clip_low = (advantages < 0) & (ratio < 1.0 - cfg.clip_ratio_low)
    loss = torch.where(clip_high, -advantages * (1.0 + cfg.clip_ratio_high), loss)
    loss = torch.where(clip_low, -advantages * (1.0 - cfg.clip_ratio_low), loss)
    if cfg.clip_ratio_c is None:
        dual = torch.zeros_like(clip_high)
    else:
        # The cap -c*A sits above the clipped loss unless r > c (> 1, so never with clip_low).
        dual = (advantages < 0) & (ratio > cfg.clip_ratio_c)
        loss = torch.where(dual, -advantages * cfg.clip_ratio_c, loss)
    return loss, {"clip_high": clip_high, "clip_low": clip_low, "dual": dual}


# ----------------------------------------------------------------------------------------------- loss modes

PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, "PolicyLossConfig"], tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSS_MODES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str, *, dual_clip: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register `fn(logprobs, old_logprobs, advantages, mask, cfg) -> (per-token loss [N, T], clip masks)`.

    The clip masks are booleans named clip_high / clip_low / dual (where the respective clip binds). `dual_clip`:
    it applies `clip_ratio_c` (validation refuses clip_ratio_c with a mode that does not).
    """
    def decorate(fn: PolicyLossFn) -> PolicyLossFn:
        fn.dual_clip = dual_clip
        POLICY_LOSS_MODES[name] = fn
        return fn
    return decorate


@register_policy_loss("vanilla", dual_clip=True)
def vanilla_pg_loss(logprobs, old_logprobs, advantages, mask, cfg):
    """PPO / DAPO: token ratio r_t = pi_t / pi_old_t, Clip-Higher and dual-clip (`clipped_pg_loss`)."""
    return clipped_pg_loss(torch.exp(_log_ratio(logprobs, old_logprobs, mask)), advantages, cfg)


@register_policy_loss("gspo")
def gspo_pg_loss(logprobs, old_logprobs, advantages, mask, cfg):
    """GSPO (Zheng et al. 2025): one ratio per sequence, s_i = exp(mean_t log(pi_t / pi_old_t)) over loss tokens.

    Token form s_{i,t} = sg[s_i] * pi_t / sg[pi_t]: its value is s_i on every token and d s_{i,t} / d log pi_t =
    s_i, so per-token advantages and masks work; with one advantage per sequence and seq-mean-token-mean this is
    the paper's sequence objective. Clipped to [1 - low, 1 + high] like the token ratio (no dual-clip): where the
    clip binds, the whole sequence's gradient is 0.
    """
    log_ratio = _log_ratio(logprobs, old_logprobs, mask)
    seq_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    live = torch.where(mask > 0, logprobs, torch.zeros_like(logprobs))  # padding log-probs may be garbage
    return clipped_pg_loss(torch.exp(seq_log_ratio.detach() + live - live.detach()), advantages, cfg)


@register_policy_loss("cispo")
def cispo_pg_loss(logprobs, old_logprobs, advantages, mask, cfg):
    """CISPO (MiniMax-M1): loss_t = -sg[clip(r_t, 1 - low, 1 + high)] * A_t * log pi_t.

    Every token keeps a gradient (-A * clipped weight); the clip only bounds the weight. clip_high / clip_low
    count the tokens whose weight was clipped (r > 1 + high, r < 1 - low), whatever the sign of A.
    """
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask)).detach()
    weight = ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    live = torch.where(mask > 0, logprobs, torch.zeros_like(logprobs))
    clip_high, clip_low = ratio > 1.0 + cfg.clip_ratio_high, ratio < 1.0 - cfg.clip_ratio_low
    return -advantages * weight * live, {"clip_high": clip_high, "clip_low": clip_low,
                                         "dual": torch.zeros_like(clip_high)}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, mask: Tensor) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_ratio = _log_ratio(logprobs, ref_logprobs, mask)  # log pi - log pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator in ("k3", "low_var_kl"):
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"kl_estimator must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------ the loss

def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    cfg: PolicyLossConfig,
    *,
    global_token_count=None,
    global_seq_count=None,
    ref_logprobs: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the policy loss (`cfg.loss_mode`), and detached metrics.

    All tensors are [num_seqs, T], padded; `loss_mask` is 1 on response tokens that train, 0 elsewhere;
    `advantages` are already per token. `old_logprobs` are the trainer's recomputed log-probs of the policy that
    generated the batch; `rollout_logprobs` the engine's, used only by rollout correction (`cfg.rollout_correction`,
    or its shorthand `cfg.tis_cap`), whose detached weights multiply each token's policy-gradient loss.

    loss = agg(pg_loss * w) + kl_coef * agg(kl(logprobs, ref_logprobs)) - entropy_coef * agg(entropy),
    every agg with the same mode and counts; the KL term is left out with use_kl_in_reward (it is in the reward).
    Normalisation: see the module docstring. Summing the returned loss over micro-batches and DP ranks gives the
    global-batch loss when `global_token_count` (token-mean) or `global_seq_count` (seq-mean-*) are the step's
    totals; None uses this micro-batch's own counts.

    Metrics are means over this micro-batch's unmasked tokens, except `*_seq_frac` (means over its sequences with
    a loss token); `num_tokens` / `num_seqs` let callers weight them.
    """
    mask = loss_mask.to(logprobs.dtype)
    _check_inputs(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs, entropy, rollout_logprobs)

    def agg(loss_mat: Tensor) -> Tensor:
        return agg_loss(loss_mat, mask, cfg.loss_agg_mode, global_token_count, global_seq_count,
                        cfg.loss_scale_factor)

    old_logprobs = old_logprobs.detach()
    pg_losses, clipped = POLICY_LOSS_MODES[cfg.loss_mode](logprobs, old_logprobs, advantages.detach(), mask, cfg)
    metrics = {}
    if cfg.rollout_correction.enabled:
        weights, corr_metrics = rollout_correction_weights(old_logprobs, rollout_logprobs, mask,
                                                           cfg.rollout_correction)
        pg_losses = pg_losses * weights
        metrics.update(corr_metrics)
    pg_loss = agg(pg_losses)
    loss = pg_loss

    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs.detach(), cfg.kl_estimator, mask)
        metrics["kl"] = _masked_mean(kl.detach(), mask)
        if cfg.kl_in_loss:
            loss = loss + cfg.kl_coef * agg(kl)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach(), mask)
        if cfg.entropy_coef != 0.0:
            loss = loss - cfg.entropy_coef * agg(entropy)

    log_ratio = _log_ratio(logprobs.detach(), old_logprobs, mask)
    metrics.update({
        "pg_loss": pg_loss.detach(),
        "pg_clipfrac_high": _masked_mean(clipped["clip_high"].to(mask.dtype), mask),
        "pg_clipfrac_low": _masked_mean(clipped["clip_low"].to(mask.dtype), mask),
        "pg_clipfrac_dual": _masked_mean(clipped["dual"].to(mask.dtype), mask),
        "ppo_kl": _masked_mean(-log_ratio, mask),
        "num_tokens": mask.sum().detach(),
        "num_seqs": count_loss_seqs(mask).to(mask.dtype),
    })
    return loss, metrics


def _check_inputs(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs, entropy, rollout_logprobs):
    named = {"old_logprobs": old_logprobs, "advantages": advantages, "loss_mask": mask, "ref_logprobs": ref_logprobs,
             "entropy": entropy, "rollout_logprobs": rollout_logprobs}
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)} like logprobs "
                             "(advantages must be per token: see broadcast_to_tokens)")
    if cfg.kl_in_loss and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs (set kl_coef: 0.0 to train without a reference)")
    if cfg.entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={cfg.entropy_coef} needs the per-token entropy "
                         "(compute_entropy=True in vocab_parallel_logprobs)")
    if cfg.rollout_correction.enabled and rollout_logprobs is None:
        raise ValueError("rollout_correction (or tis_cap) needs rollout_logprobs from the engine "
                         "(set rollout_correction.level: null and tis_cap: null to disable)")
