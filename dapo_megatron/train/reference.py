"""The frozen reference policy for the KL term: the initial weights (model.path) in the actor's parallel layout.

Built only when `algorithm.kl_coef > 0` (`build_reference` returns None otherwise): DAPO runs neither build nor
load it. It reuses the actor's model building (`build_model` + `load_hf_weights`) and its log-prob pass
(`Actor.compute_logprobs`: the same micro-batches, chunked vocab-parallel log-probs and gather to every rank), and
has no optimizer, no DDP wrapper and no gradients. It lives on the actor's device for the whole run.

`use_kl_in_reward` (verl's GRPO semantics) is sequence-level: each response's reward becomes
    r_i - kl_coef * sum_t KL_t(pi_old || pi_ref)      (the configured k1/k2/k3 estimator over its loss tokens)
and the group-normalised advantages are recomputed from the shaped rewards; the loss then has no KL term.
"""
import resource
import time
from itertools import groupby

import torch

from ..algo.advantages import compute_group_advantages
from ..algo.loss import kl_penalty
from ..models import build_model
from ..models.weights import load_hf_weights, safetensors_getter
from .actor import Actor
from .head import ResponseHead
from .packing import sequence_multiple


class ReferencePolicy(Actor):
    """An Actor without optimizer: `compute_logprobs(samples)` fills `sample.metadata['ref_logprobs']`."""

    def __init__(self, model_cfg, actor_cfg, pad_id: int):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        t0, rss0, gpu0 = time.perf_counter(), _rss_mb(), _gpu_mb()
        self.cfg, self.pad_id, self.loss_cfg = actor_cfg, pad_id, None
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        tracker_states = get_cuda_rng_tracker().get_states()
        # the actor's precision (actor.bf16): a bf16 actor against an fp32 reference would measure their rounding as
        # KL at step 1, and take twice the memory the plan (memory.py) counts for the reference
        bf16 = actor_cfg.precision(torch.cuda.is_available())["bf16"]
        dtype = torch.bfloat16 if bf16 else torch.float32
        with torch.random.fork_rng(devices=[]):  # building must not move the actor's random streams
            module, self.arch = build_model(model_cfg, config_overrides={"bf16": bf16, "params_dtype": dtype,
                                                                         "pipeline_dtype": dtype})
        get_cuda_rng_tracker().set_states(tracker_states)
        if bf16:
            module.bfloat16()  # as the actor (Float16Module): the local spec builds its norms in fp32
        load_hf_weights(module, self.arch, safetensors_getter(model_cfg.path))
        module.config.variable_seq_lengths = True  # each micro-batch is padded to its own length
        module.requires_grad_(False)
        module.eval()
        self.model, self.config = module, module.config
        self.multiple = sequence_multiple(actor_cfg.pad_to_multiple_of, module.config.tensor_model_parallel_size,
                                          module.config.sequence_parallel)
        self.head = ResponseHead(module.output_layer) if ps.is_pipeline_last_stage() else None
        param_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2 ** 20
        self.build_metrics = {"ref/param_mb": param_mb, "ref/build_s": time.perf_counter() - t0,
                              "ref/build_rss_mb": _rss_mb() - rss0}
        if torch.cuda.is_available():
            self.build_metrics["ref/build_gpu_mb"] = _gpu_mb() - gpu0

    def compute_logprobs(self, samples, key: str = "ref_logprobs") -> None:
        super().compute_logprobs(samples, key)
        self.model.eval()  # the actor's pass ends in train mode

    def train_step(self, samples):
        raise RuntimeError("the reference policy is frozen")

    def step(self, batch, algorithm) -> dict:
        """Reference log-probs for `batch` (and KL-shaped advantages with use_kl_in_reward). Collective.

        Metrics: time and memory of the pass; `ref/logprob_diff_vs_old_max` = max |ref - old| (0 before the first
        update: the reference is the initial policy).
        """
        peak0, gpu0, t0 = _peak_rss_mb(), _gpu_mb(), time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.compute_logprobs(batch)
        m = {**self.build_metrics, "ref/pass_s": time.perf_counter() - t0,
             # CPU: growth of the process's peak RSS during the pass (0 when under an earlier peak)
             "ref/pass_peak_rss_growth_mb": _peak_rss_mb() - peak0}
        if torch.cuda.is_available():
            m["ref/pass_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20 - gpu0
        m["ref/logprob_diff_vs_old_max"] = max(
            (abs(a - b) for s in batch for a, b in zip(s.metadata["ref_logprobs"], _old(s))), default=0.0)
        if algorithm.use_kl_in_reward:
            m.update(apply_kl_in_reward(batch, algorithm))
        return m


def build_reference(cfg, pad_id: int):
    """The reference policy when a KL term needs it (algorithm.kl_coef > 0), else None (nothing is loaded)."""
    if not cfg.algorithm.needs_reference:
        return None
    return ReferencePolicy(cfg.model, cfg.actor, pad_id)


def _old(s):
    return s.metadata.get("old_logprobs") or s.rollout_logprobs


def kl_in_reward_penalties(batch, algorithm) -> list[float]:
    """kl_coef * sum over each response's loss tokens of KL(pi_old || pi_ref) (the configured estimator)."""
    out = []
    for s in batch:
        old = torch.tensor(_old(s)[:len(s.response_ids)], dtype=torch.float64).unsqueeze(0)
        ref = torch.tensor(s.metadata["ref_logprobs"], dtype=torch.float64).unsqueeze(0)
        mask = torch.tensor(s.loss_mask if s.loss_mask is not None else [1] * old.shape[1],
                            dtype=torch.float64).unsqueeze(0)
        out.append(algorithm.kl_coef * float((kl_penalty(old, ref, algorithm.kl_estimator, mask) * mask).sum()))
    return out


def apply_kl_in_reward(batch, algorithm) -> dict:
    """Shape rewards by the KL penalty and recompute each group's advantages (groups are consecutive)."""
    penalties = kl_in_reward_penalties(batch, algorithm)
    for s, p in zip(batch, penalties):
        s.metadata["kl_penalty"] = p
    for _, group in groupby(batch, key=lambda s: s.group_id):
        group = list(group)
        shaped = torch.tensor([s.reward - s.metadata["kl_penalty"] for s in group], dtype=torch.float64)
        adv = compute_group_advantages(shaped, len(group), eps=algorithm.adv_eps,
                                       norm_by_std=algorithm.norm_adv_by_std, leave_one_out=algorithm.leave_one_out)
        for s, a in zip(group, adv.tolist()):
            s.metadata["advantage"] = a
    return {"ref/kl_reward_penalty_mean": sum(penalties) / max(len(penalties), 1)}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _gpu_mb() -> float:
    return torch.cuda.memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0.0
