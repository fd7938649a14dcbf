"""The Megatron actor: log-probs and DAPO policy updates through megatron-core's pipeline schedules.

Data layout: every rank receives the same list of samples for an optimizer step; data-parallel rank d trains on the
d-th part of a token-balanced partition (`packing.dp_partition`, the same on every rank), split into the same number
of micro-batches on every rank (`packing.microbatch_groups`): at most `micro_batch_size` sequences, or token-
balanced within `max_tokens_per_microbatch`. A micro-batch is packed end to end without padding
(`use_remove_padding`, THD) or right-padded; the LM head runs on response positions only (`head.ResponseHead`) and
the loss reads the response-major [B, R] layout of `packing.pack_microbatch`. The token-mean divisor is the number
of loss tokens of the whole step on all DP ranks, and DDP sums (does not average) gradients
(`calculate_per_token_loss`), so the update equals one big-batch update.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..algo.loss import PolicyLossConfig, policy_loss
from ..models import ModelConfig, build_model
from ..models.weights import iter_hf_weights, load_hf_weights, safetensors_getter
from ..types import Sample
from .head import ResponseHead
from .logprobs import vocab_parallel_logprobs
from .moe_metrics import MoEStats
from .packing import (
    TOKEN_FIELDS,
    dp_partition,
    microbatch_groups,
    pack_microbatch,
    packed_seq_params,
    seq_len,
    sequence_multiple,
    to_rows,
)
from .routing_replay import MODES as ROUTING_REPLAY_MODES
from .routing_replay import R2_KEY, RoutingReplay
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
    # Megatron's mixed precision (--bf16): bf16 parameters and activations, fp32 gradients (grad_reduce_in_fp32) and
    # fp32 main weights in the optimizer. null: on with a GPU, off (fp32 throughout) on CPU.
    bf16: Optional[bool] = None
    use_distributed_optimizer: Optional[bool] = None  # shard fp32 main weights + Adam state over DP; null: GPU only
    max_tokens_per_microbatch: Optional[int] = None  # token budget per micro-batch (balanced); None: micro_batch_size
    use_remove_padding: bool = True  # pack sequences end to end (THD, no padding); false: right-padded [B, S]
    # Activation recompute, passed to megatron's TransformerConfig (Megatron names): null | selective | full.
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # full only: uniform | block
    recompute_num_layers: Optional[int] = None  # full only: layers per recompute unit (uniform) / recomputed (block)
    recompute_old_logprobs: bool = True  # False: trust the engine's log-probs as the old policy
    logprob_chunk_size: Optional[int] = None  # tokens per log-prob chunk; None: a 16 MiB fp32 chunk on CPU, 512 on GPU
    pad_to_multiple_of: int = 8
    # MoE routing replay (train/routing_replay.py): none | r2 (the update replays the experts the old-log-prob pass
    # chose) | r3 (both passes replay the experts the rollout engine chose, SGLang's routed_experts)
    routing_replay: str = "none"

    def __post_init__(self):
        for key in ("bf16", "use_distributed_optimizer"):
            if getattr(self, key) not in (None, True, False):
                raise ValueError(f"actor.{key}={getattr(self, key)!r}; use true, false or null (null: on with a GPU, "
                                 "off on CPU)")
        if self.bf16 is not False and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError("actor.bf16: this GPU has no bf16 (compute capability < 8.0); set actor.bf16=false")
        if self.routing_replay not in ROUTING_REPLAY_MODES:
            raise ValueError(f"actor.routing_replay={self.routing_replay!r}; use one of "
                             f"{', '.join(ROUTING_REPLAY_MODES)}")
        if self.routing_replay == "r2" and not self.recompute_old_logprobs:
            raise ValueError("actor.routing_replay=r2 replays the routing of the old-log-prob pass, which "
                             "actor.recompute_old_logprobs=false skips: set it true, or use r3 (the engine's routing)")
        if self.routing_replay != "none" and self.recompute_granularity == "full":
            raise ValueError("actor.routing_replay with actor.recompute_granularity=full is not supported (the "
                             "recomputed router would not see the micro-batch's indices): use selective or null")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"actor.global_batch_size={self.global_batch_size} must be a multiple of "
                             f"actor.micro_batch_size={self.micro_batch_size}")
        if self.ppo_epochs < 1:
            raise ValueError("actor.ppo_epochs must be >= 1")
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 1:
            raise ValueError("actor.max_tokens_per_microbatch must be >= 1 (or null)")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(f"actor.recompute_granularity={self.recompute_granularity!r}; use null, selective or full")
        if self.recompute_granularity == "full":
            if self.recompute_method not in ("uniform", "block") or not (self.recompute_num_layers or 0) >= 1:
                raise ValueError("actor.recompute_granularity=full needs actor.recompute_method (uniform | block) "
                                 "and actor.recompute_num_layers >= 1")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ValueError("actor.recompute_method / actor.recompute_num_layers apply only with "
                             "actor.recompute_granularity=full; remove them")

    def transformer_overrides(self) -> dict:
        """The TransformerConfig fields this section sets (activation recompute)."""
        replay = {"moe_enable_routing_replay": True} if self.routing_replay != "none" else {}
        if self.recompute_granularity is None:
            return replay
        return {**replay, "recompute_granularity": self.recompute_granularity,
                "recompute_method": self.recompute_method, "recompute_num_layers": self.recompute_num_layers}

    def precision(self, on_gpu: bool) -> dict:
        """bf16 and use_distributed_optimizer, nulls resolved for the device."""
        return {"bf16": on_gpu if self.bf16 is None else bool(self.bf16),
                "use_distributed_optimizer": on_gpu if self.use_distributed_optimizer is None
                else bool(self.use_distributed_optimizer)}


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
        on_gpu = torch.cuda.is_available()
        self.precision = prec = cfg.precision(on_gpu)  # recorded in checkpoints (train/checkpoint.py)
        dtype = torch.bfloat16 if prec["bf16"] else torch.float32
        module, self.arch = build_model(model_cfg, config_overrides={
            **cfg.transformer_overrides(), "bf16": prec["bf16"], "params_dtype": dtype, "pipeline_dtype": dtype})
        if prec["bf16"]:
            # What Megatron-LM's Float16Module does: every parameter bf16. The local spec's torch norms are built in
            # fp32 whatever params_dtype says, and a model with both dtypes breaks the distributed optimizer (its
            # param -> main-shard index assumes one dtype order: measured on CPU, norms matched to qkv biases).
            module.bfloat16()
        if load_hf:
            load_hf_weights(module, self.arch, safetensors_getter(model_cfg.path))
        config = module.config
        config.calculate_per_token_loss = True  # DDP sums gradients; the loss carries the global divisor
        config.variable_seq_lengths = True  # each micro-batch is padded to its own length
        config.finalize_model_grads_func = lambda models, num_tokens=None, **kw: finalize_model_grads(models, None, **kw)
        dist_opt = prec["use_distributed_optimizer"]
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=dist_opt)
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=module)
        config.no_sync_func = self.model.no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
            bf16=prec["bf16"], params_dtype=config.params_dtype, use_distributed_optimizer=dist_opt), [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps, lr_decay_steps=max(cfg.lr_decay_steps, cfg.lr_warmup_steps + 1),
            lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=1, wd_incr_style="constant")
        self.config = config
        self.multiple = sequence_multiple(cfg.pad_to_multiple_of, config.tensor_model_parallel_size,
                                          config.sequence_parallel)
        self.head = ResponseHead(module.output_layer) if ps.is_pipeline_last_stage() else None
        self.replay = RoutingReplay(module, cfg.routing_replay, self.arch.num_layers,
                                    self.arch.moe.topk if self.arch.moe else 1, bool(config.sequence_parallel))
        self.moe_stats = MoEStats(module, self.arch.moe.num_experts, self.arch.moe.topk,
                                  config.moe_expert_capacity_factor) if self.arch.moe else None

    # ---- helpers -------------------------------------------------------------------------------------------
    def _chunk(self, logits) -> int:
        # On CPU a [chunk, V_local] fp32 buffer that fits in cache beats a large one (measured: 1024 -> 128 tokens
        # at V=32k halved the log-prob pass, -13% step time; tools/bench_step.py).
        if self.cfg.logprob_chunk_size:
            return self.cfg.logprob_chunk_size
        return 512 if logits.is_cuda else max(1, 2 ** 24 // (4 * logits.shape[-1]))

    def _layouts(self, samples: list[Sample]) -> list[list[list[int]]]:
        """Sample indices of each micro-batch of every DP rank (a pure function of the samples: every rank computes
        the same; the same micro-batch count on every rank; [] = a zero-loss dummy)."""
        cfg = self.cfg
        lengths = [seq_len(s) for s in samples]
        parts = dp_partition(lengths, self.dp_size)
        groups = microbatch_groups([[lengths[i] for i in part] for part in parts],
                                   micro_batch_size=cfg.micro_batch_size, budget=cfg.max_tokens_per_microbatch,
                                   packed=cfg.use_remove_padding, multiple=self.multiple)
        return [[[part[j] for j in g] for g in rank_groups] for part, rank_groups in zip(parts, groups)]

    def _layout(self, samples: list[Sample]) -> list[list[int]]:
        """Sample indices of each micro-batch of this DP rank."""
        return self._layouts(samples)[self.dp_rank]

    def _microbatches(self, samples, layout, replay: bool = False):
        fields = TOKEN_FIELDS
        if samples and all("ref_logprobs" in s.metadata for s in samples):  # the reference policy's (reference.py)
            fields = {**TOKEN_FIELDS, "ref_logprobs": lambda s: s.metadata["ref_logprobs"]}
        mbs = [pack_microbatch([samples[i] for i in idx], self.pad_id, self.multiple,
                               packed=self.cfg.use_remove_padding, token_fields=fields) for idx in layout]
        if replay:  # the experts each token must take (routing_replay.py); None where nothing is replayed
            for mb, idx in zip(mbs, layout):
                mb["replay"] = self.replay.targets([samples[i] for i in idx], mb, self.cfg.use_remove_padding)
        return mbs

    def _run(self, microbatches, loss_fn, forward_only, record_routing: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = next(self.model.parameters()).device
        it = iter(microbatches)
        replay = getattr(self, "replay", None)  # the reference policy has none

        def forward_step(data_iter, model):
            mb = next(data_iter)
            if self.head is not None:
                self.head.index = mb["head_index"]
            if replay is not None:
                replay.before_forward(mb, record_routing)
            out = model(mb["tokens"].to(device), mb["position_ids"].to(device), None,
                        packed_seq_params=packed_seq_params(mb, device))
            if replay is not None:
                replay.after_forward(mb, record_routing)
            return out, lambda logits: loss_fn(logits[0], mb)  # logits [1, N, V_local]: response positions only

        seq = max(mb["tokens"].shape[1] for mb in microbatches)
        mbs = 1 if self.cfg.use_remove_padding else self.cfg.micro_batch_size
        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=it, model=[self.model],
                num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)
        finally:
            if self.head is not None:
                self.head.index = None  # a forward outside the actor's schedule gets the full head

    # ---- public API ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], key: str = "old_logprobs") -> None:
        """Store this policy's log-probs of every response token in `sample.metadata[key]` (on all ranks)."""
        from megatron.core import parallel_state as ps

        self.model.eval()
        layouts = self._layouts(samples)  # every sample lands on one DP rank, also when the batch is not divisible
        layout = layouts[self.dp_rank]
        mode = getattr(self, "replay", None) and self.replay.active and key == "old_logprobs" and self.replay.mode
        mbs = self._microbatches(samples, layout, replay=mode == "r3")

        def loss_fn(logits, mb):
            logp, _ = vocab_parallel_logprobs(logits, mb["targets"].to(logits.device), chunk_size=self._chunk(logits),
                                              vocab_size=self.arch.vocab_size, overwrite_logits=True)
            return logp.sum() * 0, torch.ones((), dtype=torch.int), {"logp": to_rows(logp, mb).cpu()}

        out = self._run(mbs, loss_fn, forward_only=True, record_routing=mode == "r2")
        if mode == "r2":
            self.replay.store_recorded(samples, mbs, layouts, self.dp_rank, self.cfg.use_remove_padding)
        # The last pipeline stage holds the values (identical on its TP ranks): TP rank 0 of each DP rank sends its
        # samples' response log-probs as one flat tensor, in its layout's order, and every rank receives all of them.
        values, sender = None, None
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            spans = [rec["logp"][row, :n] for mb, rec in zip(mbs, out) if not mb["dummy"]
                     for row, n in enumerate(mb["response_lengths"])]
            values, sender = (torch.cat(spans) if spans else torch.empty(0)), self.dp_rank
        order = [[i for idx in rank_layout for i in idx] for rank_layout in layouts]
        by_dp = share_response_values(values, [[len(samples[i].response_ids) for i in o] for o in order], sender)
        for o, parts in zip(order, by_dp):
            for i, part in zip(o, parts):
                samples[i].metadata[key] = part
        self.model.train()

    def train_step(self, samples: list[Sample]) -> dict:
        """One optimizer step on `samples` (the global mini-batch, identical on every rank)."""
        from megatron.core import parallel_state as ps

        if len(samples) % self.dp_size:
            raise ValueError(f"train_step got {len(samples)} samples, not a multiple of the data-parallel size "
                             f"{self.dp_size} (train_on_batch trims mini-batches to one)")
        self.model.train()
        r2_ready = all(R2_KEY in s.metadata for s in samples)
        if self.replay.active and self.replay.mode == "r2" and not r2_ready:
            raise RuntimeError("actor.routing_replay=r2: train_step got samples without the old-log-prob pass's "
                               "routing (compute_logprobs records it)")
        mbs = self._microbatches(samples, self._layout(samples), replay=self.replay.active)
        total_tokens = torch.tensor(sum(float(mb["loss_mask"].sum()) for mb in mbs))
        total_seqs = torch.tensor(float(sum(int((mb["loss_mask"].sum(1) > 0).sum()) for mb in mbs)))
        router_tokens = torch.tensor(float(sum(mb["tokens"].numel() for mb in mbs)))  # MoE aux-loss divisor
        counts = torch.stack([total_tokens, total_seqs, router_tokens])
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        global_tokens, global_seqs = counts[0].clamp(min=1), counts[1].clamp(min=1)
        need_entropy = self.loss_cfg.entropy_coef != 0.0

        def loss_fn(logits, mb):
            mb = {k: (v.to(logits.device) if torch.is_tensor(v) else v) for k, v in mb.items()}
            # Entropy is differentiated only when it is in the loss. When it is only logged, its forward costs two
            # passes over each chunk and (fp32 logits) the softmax becomes the gradient in the logits' own buffer.
            logp, ent = vocab_parallel_logprobs(logits, mb["targets"], chunk_size=self._chunk(logits),
                                                compute_entropy=True, vocab_size=self.arch.vocab_size,
                                                differentiable_entropy=need_entropy, overwrite_logits=True)
            logp, ent = to_rows(logp, mb), to_rows(ent, mb)
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
        if self.moe_stats is None:
            out = self._run(mbs, loss_fn, forward_only=False)
        else:
            with self.moe_stats.collect(aux_scale=1.0 / float(counts[2].clamp(min=1))):  # moe_metrics.py
                out = self._run(mbs, loss_fn, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        m = self._reduce_metrics(out if ps.is_pipeline_last_stage() else [], grad_norm, ok)
        if self.moe_stats is not None:
            m.update(self.moe_stats.metrics(self.arch.num_layers, [i for i, x in enumerate(self.arch.moe.layer_pattern)
                                                                   if x], len(mbs)))
        return m

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
