"""Routing replay for MoE policies (`actor.routing_replay: none | r2 | r3`) on megatron-core's RouterReplay.

megatron-core 0.16.1 has the mechanism (`moe_enable_routing_replay`: every TopKRouter owns a `RouterReplay`; with
action REPLAY_FORWARD its top-k is the given indices and the gate probabilities are recomputed from the current
router logits at those indices, softmax over the k when `moe_router_pre_softmax=False`, gather of the full softmax
otherwise, so the router still gets a gradient). This module only says *which* indices, per micro-batch:

  r2  the routing the trainer itself chose in the old-log-prob pass (`compute_logprobs` records it, per sample), so
      every forward of the update routes each token exactly as the pass that produced `old_logprobs` did;
  r3  the routing the rollout engine chose (SGLang's `routed_experts`: int32 [prompt + response - 1, num_layers,
      topk], the prompt's prefill routing included), replayed in the old-log-prob pass and the update.

Token layout. A router sees its micro-batch flattened in megatron's [s, b] order ([T, 1] packed, [S, B] padded), and
with sequence parallelism only this TP rank's contiguous 1/tp of it. Positions without a recorded routing (padding,
the last token of a sequence, which the engine never feeds) get experts 0..k-1: their outputs feed no loss term
(causal attention; the LM head reads response positions only), and megatron's aux loss is computed from the router
logits, not from these indices.
"""
import base64
from typing import Optional

import torch

MODES = ("none", "r2", "r3")
R2_KEY = "r2_routing"  # sample.metadata: (global layer ids, int16 [seq_len, n_local_layers, topk]) of this stage


# ---------------------------------------------------------------------------- pure helpers
def decode_routed_experts(b64: str, num_layers: int, topk: int) -> torch.Tensor:
    """SGLang's `meta_info.routed_experts` (base64 of int32 [tokens, num_layers, topk]) as a tensor."""
    raw = base64.b64decode(b64)
    return torch.frombuffer(bytearray(raw), dtype=torch.int32).reshape(-1, num_layers, topk)


def encode_routed_experts(t: torch.Tensor) -> str:
    return base64.b64encode(t.to(torch.int32).contiguous().numpy().tobytes()).decode("ascii")


def token_owners(lengths: list[int], packed: bool, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, position) of every token a router sees, in megatron's [s, b] flattening (-1: padding).

    packed: [1, width] sequences end to end; padded: [B, width] right-padded, flattened as s * B + b."""
    if packed:
        owner = torch.full((width,), -1, dtype=torch.long)
        pos = torch.full((width,), -1, dtype=torch.long)
        o = 0
        for i, n in enumerate(lengths):
            owner[o:o + n], pos[o:o + n] = i, torch.arange(n)
            o += n
        return owner, pos
    B = len(lengths)
    s = torch.arange(width).repeat_interleave(B)
    b = torch.arange(B).repeat(width)
    valid = s < torch.tensor(lengths)[b]
    return torch.where(valid, b, -1), torch.where(valid, s, -1)


def layout_indices(per_sample: list[Optional[torch.Tensor]], owner: torch.Tensor, pos: torch.Tensor,
                   topk: int) -> torch.Tensor:
    """[N, topk] expert indices of one layer in a micro-batch's token order, from per-sample [L_i, topk] routings
    (None or too short: the default 0..k-1 for the missing positions)."""
    out = torch.arange(topk, dtype=torch.long).expand(len(owner), topk).clone()
    for i, r in enumerate(per_sample):
        if r is None or not len(r):
            continue
        sel = (owner == i) & (pos < len(r)) & (pos >= 0)
        rows = r[pos[sel]].long()
        ok = (rows >= 0).all(dim=1)  # a -1 row (a dense layer, unknown) keeps the default
        idx = sel.nonzero().squeeze(1)
        out[idx[ok]] = rows[ok]
    return out


def sequence_shard(t: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's rows under sequence parallelism (megatron scatters the [s*b] tokens in tp contiguous parts)."""
    if tp_size == 1:
        return t
    n = t.shape[0] // tp_size
    return t[tp_rank * n:(tp_rank + 1) * n]


# ---------------------------------------------------------------------------- the model's routers
def local_routers(model) -> list:
    """(global 0-based layer, TopKRouter) of this rank's MoE layers, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    out = [(int(m.layer_number) - 1, m) for m in model.modules() if isinstance(m, TopKRouter)]
    return sorted(out, key=lambda x: x[0])


class RoutingReplay:
    """Per-micro-batch driver of the routers' RouterReplay (one per Actor)."""

    def __init__(self, model, mode: str, num_layers: int, topk: int, sequence_parallel: bool):
        if mode not in MODES:
            raise ValueError(f"actor.routing_replay={mode!r}; use one of {', '.join(MODES)}")
        self.mode, self.num_layers, self.topk = mode, num_layers, topk
        self.routers = local_routers(model) if mode != "none" else []
        if mode != "none" and any(r.router_replay is None for _, r in self.routers):
            raise RuntimeError("routing replay needs the model built with moe_enable_routing_replay=True")
        self.sequence_parallel = sequence_parallel
        self.last_used: list = []  # [(layer, indices)] of the last replayed micro-batch (tests read it back)
        self._decoded: dict = {}  # id(sample) -> (its routed_experts string, decoded tensor); not on the Sample

    @property
    def active(self) -> bool:
        return bool(self.routers)

    def _tp(self):
        from megatron.core import parallel_state as ps

        if not self.sequence_parallel:
            return 1, 0
        return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()

    # ---- building a micro-batch's targets (on the host, once per micro-batch) ----
    def targets(self, samples: list, mb: dict, packed: bool) -> Optional[dict]:
        """{layer: [N, topk]} for this rank's routers (full micro-batch, before the sequence-parallel shard)."""
        if not self.active:
            return None
        width = mb["tokens"].shape[1]
        owner, pos = token_owners(mb["lengths"], packed, width)
        out = {}
        for j, (layer, _) in enumerate(self.routers):
            out[layer] = layout_indices([self._sample_layer(s, layer, j) for s in samples], owner, pos, self.topk)
        return out

    def _sample_layer(self, s, layer: int, j: int) -> Optional[torch.Tensor]:
        if self.mode == "r3":
            if not s.routed_experts:
                return None
            cache = self._decoded.get(id(s))  # decoded once per sample (a step reads it once per MoE layer)
            if cache is None or cache[0] is not s.routed_experts:
                t = decode_routed_experts(s.routed_experts, self.num_layers, self.topk)
                want = len(s.prompt_ids) + len(s.response_ids) - 1
                if t.shape[0] != want:
                    raise ValueError(f"routed_experts of a sample holds {t.shape[0]} tokens, expected prompt + "
                                     f"response - 1 = {want} (SGLang's layout [tokens, {self.num_layers} layers, "
                                     f"{self.topk}]); the engine's routing does not match the sample")
                cache = (s.routed_experts, t)
                if len(self._decoded) > 4096:
                    self._decoded.clear()
                self._decoded[id(s)] = cache
            return cache[1][:, layer]
        rec = s.metadata.get(R2_KEY)
        return None if rec is None else rec[1][:, j]

    # ---- around every forward of the schedule ----
    def before_forward(self, mb: dict, record: bool) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

        if not self.active:
            return
        targets = mb.get("replay")
        tp, rank = self._tp()
        self.last_used = []
        for layer, r in self.routers:
            rr = r.router_replay
            rr.clear_indices()
            if record:
                rr.set_router_replay_action(A.RECORD)
            elif targets is not None:
                t = sequence_shard(targets[layer], tp, rank)
                rr.set_target_indices(t)
                rr.set_router_replay_action(A.REPLAY_FORWARD)
                self.last_used.append((layer, t))
            else:
                rr.clear_router_replay_action()

    def after_forward(self, mb: dict, record: bool) -> None:
        """With `record`: keep each router's chosen indices on `mb["recorded"]` ({layer: [N_local, topk]})."""
        if not self.active:
            return
        if record:
            mb["recorded"] = {layer: r.router_replay.get_recorded_indices().detach().cpu() for layer, r in self.routers}
        for _, r in self.routers:
            r.router_replay.clear_indices()
            r.router_replay.clear_router_replay_action()

    # ---- r2: recorded micro-batch routing -> per sample, on every DP rank of this stage ----
    def store_recorded(self, samples: list, mbs: list, layouts: list, dp_rank: int, packed: bool) -> None:
        """Put `(layers, int16 [seq_len, n_layers, topk])` on `sample.metadata[R2_KEY]` for every sample (all ranks
        of this pipeline stage; each DP rank recorded its own samples, with sequence parallelism a 1/tp shard)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        layers = [layer for layer, _ in self.routers]
        tp_group = ps.get_tensor_model_parallel_group()
        mine = []  # this DP rank's samples in layout order: [L_i, n_layers, k]
        for mb, idx in zip(mbs, layouts[dp_rank]):
            if mb["dummy"]:
                continue
            per_layer = []
            for layer in layers:
                t = mb["recorded"][layer]
                if self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
                    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
                    dist.all_gather(parts, t.contiguous(), group=tp_group)
                    t = torch.cat(parts)
                per_layer.append(t)
            full = torch.stack(per_layer, dim=1)  # [N, n_layers, k]
            owner, pos = token_owners(mb["lengths"], packed, mb["tokens"].shape[1])
            for i in range(len(idx)):
                sel = owner == i
                rows = torch.empty(mb["lengths"][i], len(layers), self.topk, dtype=torch.int16)
                rows[pos[sel]] = full[sel].to(torch.int16)
                mine.append(rows)
        lengths = [[len(samples[i].prompt_ids) + len(samples[i].response_ids) for idx in lay for i in idx]
                   for lay in layouts]
        per_dp = _all_gather_rows(mine, lengths, len(layers), self.topk, ps.get_data_parallel_group())
        for lay, parts in zip(layouts, per_dp):
            for i, part in zip([i for idx in lay for i in idx], parts):
                samples[i].metadata[R2_KEY] = (tuple(layers), part)


def _all_gather_rows(mine: list, lengths_by_dp: list, n_layers: int, topk: int, group) -> list:
    """Every DP rank's per-sample [L, n_layers, k] int16 rows (one padded all_gather of a flat int16 tensor)."""
    import torch.distributed as dist

    from .weight_stream import comm_device

    dev = comm_device()
    per = n_layers * topk
    most = max(sum(ls) for ls in lengths_by_dp) * per
    flat = torch.cat([m.reshape(-1) for m in mine]) if mine else torch.empty(0, dtype=torch.int16)
    buf = torch.zeros(most, dtype=torch.int32, device=dev)
    buf[:flat.numel()] = flat.to(torch.int32)
    parts = [torch.empty_like(buf) for _ in lengths_by_dp]
    dist.all_gather(parts, buf, group=group)
    out = []
    for part, ls in zip(parts, lengths_by_dp):
        part, o, rows = part.cpu().to(torch.int16), 0, []
        for n in ls:
            rows.append(part[o:o + n * per].reshape(n, n_layers, topk))
            o += n * per
        out.append(rows)
    return out
