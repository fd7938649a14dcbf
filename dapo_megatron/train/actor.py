"""The Megatron actor: log-probs and DAPO policy updates through megatron-core's pipeline schedules.

Data layout: every rank receives the same list of samples for an optimizer step; data-parallel rank d trains on the
d-th contiguous slice, split into micro-batches of `micro_batch_size` sequences (right-padded to a multiple of
`pad_to_multiple_of`). The token-mean divisor is the number of loss tokens of the whole step on all DP ranks, and
DDP sums (does not average) gradients (`calculate_per_token_loss`), so the update equals one big-batch update.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..algo.loss import PolicyLossConfig, policy_loss
from ..models import ModelConfig, build_model
from ..models.weights import iter_hf_weights, load_hf_weights, safetensors_getter
from ..types import Sample
from .logprobs import vocab_parallel_logprobs
from .weight_stream import share_response_values


@dataclass
class ActorConfig:
    global_batch_size: int = 64  # responses per optimizer step (PPO mini-batch)
    micro_batch_size: int = 8  # sequences per micro-batch on each data-parallel rank
    ppo_epochs: int = 1
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0  # OPTIMIZER steps of linear warmup, then constant (DAPO: 20 rollout steps = 20 x
    # rollout_batch_size x n_samples_per_prompt / global_batch_size x ppo_epochs optimizer steps)
    lr_decay_style: str = "constant"
    lr_decay_steps: int = 1_000_000
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: Optional[bool] = None  # default: on with a GPU, off on CPU
    max_tokens_per_microbatch: Optional[int] = None  # pack micro-batches by padded-token budget instead of count
    recompute_old_logprobs: bool = True  # False: trust the engine's log-probs as the old policy
    logprob_chunk_size: Optional[int] = None  # tokens per log-prob chunk; None: a 16 MiB fp32 chunk on CPU, 512 on GPU
    pad_to_multiple_of: int = 8

    def __post_init__(self):
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"actor.global_batch_size={self.global_batch_size} must be a multiple of "
                             f"actor.micro_batch_size={self.micro_batch_size}")
        if self.ppo_epochs < 1:
            raise ValueError("actor.ppo_epochs must be >= 1")


def split_by_token_budget(lengths: list[int], budget: int, multiple: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (count x longest, rounded up to `multiple`) fits `budget`.

    Order is kept, so the split is deterministic; a sequence longer than the budget gets a micro-batch of its own.
    """
    groups, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        padded = -(-max(longest, n) // multiple) * multiple
        if current and padded * (len(current) + 1) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def pack_microbatch(samples: list[Sample], pad_id: int, multiple: int, old_key: str = "old_logprobs") -> dict:
    """Right-padded [B, S] tensors; position t of `targets`/`loss_mask`/... describes the token at t+1."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    seq = -(-max(lengths) // multiple) * multiple
    B = len(samples)
    tokens = torch.full((B, seq), pad_id, dtype=torch.long)
    targets = torch.full((B, seq), pad_id, dtype=torch.long)
    mask = torch.zeros(B, seq)
    adv = torch.zeros(B, seq)
    old = torch.zeros(B, seq)
    rollout = torch.zeros(B, seq)
    for i, s in enumerate(samples):
        ids = list(s.prompt_ids) + list(s.response_ids)
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[i, :len(ids)] = torch.tensor(ids)
        targets[i, :len(ids) - 1] = torch.tensor(ids[1:])
        span = slice(p - 1, p - 1 + r)  # logits at p-1+j predict response token j
        mask[i, span] = torch.tensor(s.loss_mask if s.loss_mask is not None else [1] * r, dtype=torch.float)
        adv[i, span] = float(s.metadata.get("advantage", 0.0))
        rollout[i, span] = torch.tensor(s.rollout_logprobs[:r], dtype=torch.float)
        olds = s.metadata.get(old_key)
        old[i, span] = torch.tensor(olds if olds is not None else s.rollout_logprobs[:r], dtype=torch.float)
    pos = torch.arange(seq).unsqueeze(0).expand(B, -1).contiguous()
    out = dict(tokens=tokens, position_ids=pos, targets=targets, loss_mask=mask, advantages=adv,
               old_logprobs=old, rollout_logprobs=rollout, lengths=lengths)
    if all("ref_logprobs" in s.metadata for s in samples):  # the reference policy's (train/reference.py)
        out["ref_logprobs"] = torch.zeros(B, seq)
        for i, s in enumerate(samples):
            p = len(s.prompt_ids)
            out["ref_logprobs"][i, p - 1:p - 1 + len(s.response_ids)] = torch.tensor(s.metadata["ref_logprobs"])
    return out


class Actor:
    def __init__(self, model_cfg: ModelConfig, cfg: ActorConfig, loss_cfg: PolicyLossConfig, pad_id: int,
                 load_hf: bool = True):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg, self.loss_cfg, self.pad_id = cfg, loss_cfg, pad_id
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if cfg.global_batch_size % (cfg.micro_batch_size * self.dp_size):
            raise ValueError(f"actor.global_batch_size={cfg.global_batch_size} must be a multiple of "
                             f"micro_batch_size x data-parallel size = {cfg.micro_batch_size * self.dp_size}")
        module, self.arch = build_model(model_cfg)
        if load_hf:
            load_hf_weights(module, self.arch, safetensors_getter(model_cfg.path))
        config = module.config
        config.calculate_per_token_loss = True  # DDP sums gradients; the loss carries the global divisor
        config.variable_seq_lengths = True  # each micro-batch is padded to its own length
        config.finalize_model_grads_func = lambda models, num_tokens=None, **kw: finalize_model_grads(models, None, **kw)
        on_gpu = torch.cuda.is_available()
        dist_opt = on_gpu if cfg.use_distributed_optimizer is None else cfg.use_distributed_optimizer
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=dist_opt)
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=module)
        config.no_sync_func = self.model.no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
            bf16=on_gpu, params_dtype=config.params_dtype, use_distributed_optimizer=dist_opt), [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps, lr_decay_steps=max(cfg.lr_decay_steps, cfg.lr_warmup_steps + 1),
            lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=1, wd_incr_style="constant")
        self.config = config

    # ---- helpers -------------------------------------------------------------------------------------------
    def _chunk(self, logits) -> int:
        # On CPU a [chunk, V_local] fp32 buffer that fits in cache beats a large one (measured: 1024 -> 128 tokens
        # at V=32k halved the log-prob pass, -13% step time; tools/bench_step.py).
        if self.cfg.logprob_chunk_size:
            return self.cfg.logprob_chunk_size
        return 512 if logits.is_cuda else max(1, 2 ** 24 // (4 * logits.shape[-1]))

    def _local_slice(self, samples: list[Sample]) -> list[Sample]:
        start, end = dp_bounds(len(samples), self.dp_size)[self.dp_rank]
        return samples[start:end]

    def _microbatches(self, samples, old_key="old_logprobs"):
        cfg = self.cfg
        if cfg.max_tokens_per_microbatch:
            lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
            index_groups = split_by_token_budget(lengths, cfg.max_tokens_per_microbatch, cfg.pad_to_multiple_of)
        else:
            index_groups = [range(i, min(i + cfg.micro_batch_size, len(samples)))
                            for i in range(0, len(samples), cfg.micro_batch_size)]
        return [pack_microbatch([samples[i] for i in idx], self.pad_id, cfg.pad_to_multiple_of, old_key)
                for idx in index_groups]

    def _run(self, microbatches, loss_fn, forward_only):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = next(self.model.parameters()).device
        it = iter(microbatches)

        def forward_step(data_iter, model):
            mb = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(data_iter).items()}
            out = model(mb["tokens"], mb["position_ids"], None)
            return out, lambda logits: loss_fn(logits, mb)

        seq = max(mb["tokens"].shape[1] for mb in microbatches)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=it, model=[self.model], num_microbatches=len(microbatches),
            seq_length=seq, micro_batch_size=self.cfg.micro_batch_size, forward_only=forward_only)

    # ---- public API ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], key: str = "old_logprobs") -> None:
        """Store this policy's log-probs of every response token in `sample.metadata[key]` (on all ranks)."""
        from megatron.core import parallel_state as ps

        self.model.eval()
        local = self._local_slice(samples)  # a batch not divisible by DP: the first ranks take one more sample

        def loss_fn(logits, mb):
            logp, _ = vocab_parallel_logprobs(logits, mb["targets"], chunk_size=self._chunk(logits),
                                              vocab_size=self.arch.vocab_size)
            return logp.sum() * 0, torch.ones((), dtype=torch.int), {"logp": logp.detach().cpu()}

        # Forward only: no collective spans DP ranks, so a replica with no sample (batch < DP) skips the pass.
        out = self._run(self._microbatches(local), loss_fn, forward_only=True) if local else []
        # The last pipeline stage holds the values (identical on its TP ranks): TP rank 0 of each DP rank sends
        # its samples' response log-probs, and every rank receives all of them.
        values, sender = None, None
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            rows = [row for rec in out for row in rec["logp"]]  # one row per local sample, in order
            spans = [_response_span(row, s) for row, s in zip(rows, local)]
            values, sender = (torch.cat(spans) if spans else torch.empty(0)), self.dp_rank
        slices = [samples[start:end] for start, end in dp_bounds(len(samples), self.dp_size)]
        by_dp = share_response_values(values, [[len(s.response_ids) for s in sl] for sl in slices], sender)
        for sl, parts in zip(slices, by_dp):
            for s, part in zip(sl, parts):
                s.metadata[key] = part
        self.model.train()

    def train_step(self, samples: list[Sample]) -> dict:
        """One optimizer step on `samples` (the global mini-batch, identical on every rank)."""
        from megatron.core import parallel_state as ps

        if len(samples) % self.dp_size:
            raise ValueError(f"train_step got {len(samples)} samples, not a multiple of the data-parallel size "
                             f"{self.dp_size} (train_on_batch trims mini-batches to one)")
        self.model.train()
        local = self._local_slice(samples)
        mbs = self._microbatches(local)
        total_tokens = torch.tensor(sum(float(mb["loss_mask"].sum()) for mb in mbs))
        total_seqs = torch.tensor(float(sum(int((mb["loss_mask"].sum(1) > 0).sum()) for mb in mbs)))
        counts = torch.stack([total_tokens, total_seqs])
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        global_tokens, global_seqs = counts[0].clamp(min=1), counts[1].clamp(min=1)
        need_entropy = self.loss_cfg.entropy_coef != 0.0

        def loss_fn(logits, mb):
            logp, ent = vocab_parallel_logprobs(logits, mb["targets"], chunk_size=self._chunk(logits),
                                                compute_entropy=True, vocab_size=self.arch.vocab_size)
            loss, metrics = policy_loss(
                logp, mb["old_logprobs"], mb["advantages"], mb["loss_mask"], self.loss_cfg,
                global_token_count=global_tokens, global_seq_count=global_seqs,
                entropy=ent if need_entropy else None, ref_logprobs=mb.get("ref_logprobs"),
                rollout_logprobs=mb["rollout_logprobs"] if self.loss_cfg.rollout_correction.enabled else None)
            n = mb["loss_mask"].sum()
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["entropy"] = float((ent.detach() * mb["loss_mask"]).sum() / n.clamp(min=1))
            metrics["num_tokens"] = float(n)
            metrics["loss"] = float(loss.detach())
            return loss, n.detach().to(torch.int), metrics

        self.optimizer.zero_grad()
        self.model.zero_grad_buffer()
        out = self._run(mbs, loss_fn, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return self._reduce_metrics(out if ps.is_pipeline_last_stage() else [], grad_norm, ok)

    def _reduce_metrics(self, records, grad_norm, ok) -> dict:
        # Every metric policy_loss returns, weighted by the micro-batch's loss tokens (`*_seq_frac`: sequences).
        # Non-last pipeline stages have no records: the key set is agreed on by all ranks first.
        from megatron.core import parallel_state as ps

        local = sorted(set().union(*records) - {"num_tokens", "num_seqs", "loss", "pg_loss"})
        keys = sorted(set().union(*_gather_objects([local])))
        vals = torch.zeros(len(keys) + 3, dtype=torch.float64)
        for r in records:
            n, nseq = r["num_tokens"], r.get("num_seqs", 0.0)
            vals[:len(keys)] += torch.tensor([r.get(k, 0.0) * (nseq if k.endswith("_seq_frac") else n)
                                              for k in keys], dtype=torch.float64)
            vals[len(keys):] += torch.tensor([n, nseq, r["loss"]], dtype=torch.float64)
        dist.all_reduce(vals)  # non-last stages add zeros; TP ranks repeat the same values
        vals /= ps.get_tensor_model_parallel_world_size()
        n, nseq = max(float(vals[len(keys)]), 1.0), max(float(vals[len(keys) + 1]), 1.0)
        m = {f"actor/{k}": float(vals[i]) / (nseq if k.endswith("_seq_frac") else n) for i, k in enumerate(keys)}
        m["actor/pg_loss"] = float(vals[len(keys) + 2])
        m["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        m["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        m["actor/update_ok"] = float(bool(ok))
        return m

    def hf_weights(self):
        """(hf_name, tensor) pairs of this pipeline stage, full (TP-gathered) tensors."""
        return iter_hf_weights(self.model.module, self.arch)


def dp_bounds(n: int, dp_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) of each DP rank's share of `n` samples; the first n % dp ranks get one more."""
    per, extra = divmod(n, dp_size)
    starts = [d * per + min(d, extra) for d in range(dp_size + 1)]
    return list(zip(starts[:-1], starts[1:]))


def _response_span(row, s: Sample):
    """The positions of a packed row whose logits predict the response tokens of `s`."""
    return row[len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + len(s.response_ids)]


def _gather_objects(obj: list) -> list:
    """Every rank's list, concatenated (small Python objects only, e.g. metric names)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return [x for part in out for x in part]


def train_on_batch(actor: Actor, samples: list[Sample]) -> list[dict]:
    """`ppo_epochs` passes over the rollout batch in `global_batch_size` mini-batches (one optimizer step each).

    A short batch (dynamic sampling hit its bound with on_exhausted=train) gives a smaller last mini-batch; it is
    trimmed to a multiple of the data-parallel size so every rank trains on the same number of responses.
    """
    gbs = actor.cfg.global_batch_size
    usable = len(samples) - len(samples) % actor.dp_size
    minibatches = [samples[i:min(i + gbs, usable)] for i in range(0, usable, gbs)]
    return [actor.train_step(mb) for _ in range(actor.cfg.ppo_epochs) for mb in minibatches]
