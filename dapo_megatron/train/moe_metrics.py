"""MoE step metrics and the aux-loss gradient scale of the update.

Metrics (README, "Metrics"), over the optimizer step's update forwards, all ranks:
  moe/aux_loss                          the load-balancing loss before its coefficient (megatron's
                                        `load_balancing_loss` tracker), mean over MoE layers and micro-batches
  moe/load_max_over_mean/layer_{i}      tokens of the busiest expert / mean tokens per expert, MoE layer i (1.0:
                                        perfectly balanced; every token the router saw, padding included)
  moe/dropped_tokens                    token-expert assignments dropped by the capacity factor (only logged with
                                        model.moe_expert_capacity_factor set; drop-less routing drops none)

Aux-loss scale. The actor sets `calculate_per_token_loss` after the model is built, so the routers kept False and
each micro-batch's aux (and z) loss got backward scale 1 (the schedule's per-token setting): the step's gradient
was the *sum* over micro-batches and DP ranks (DDP sums), i.e. (micro-batches x DP) times the mean. With the
routers' `calculate_per_token_loss` on, megatron multiplies each micro-batch's aux loss by its router tokens, and
`aux_loss_scale(1 / the step's router tokens on all DP ranks)` makes the gradient the token-weighted mean over the
step, as megatron intends (its finalize would divide by the token count; the actor's does not, its loss carries the
global divisor). tests/test_moe.py checks the router gradient against a hand computation.
"""
import contextlib

import torch


def expert_load_metrics(counts: dict, dropped=None) -> dict:
    """{layer: tokens per expert [E]} (and the dropped count, or None) -> the metrics above."""
    out = {}
    for layer, c in sorted(counts.items()):
        c = c.double()
        mean = float(c.mean())
        out[f"moe/load_max_over_mean/layer_{layer}"] = float(c.max()) / mean if mean > 0 else 0.0
    if dropped is not None:
        out["moe/dropped_tokens"] = float(dropped)
    return out


@contextlib.contextmanager
def aux_loss_scale(scale: float):
    """Multiply the scale megatron's schedule gives the MoE aux-loss backward by `scale` (see module docstring)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    orig = MoEAuxLossAutoScaler.__dict__["set_loss_scale"]
    MoEAuxLossAutoScaler.set_loss_scale = staticmethod(lambda s: orig.__func__(s * scale))
    try:
        yield
    finally:
        MoEAuxLossAutoScaler.set_loss_scale = orig


class MoEStats:
    """Counts tokens per expert (and drops) on this rank's routers while `collecting`; `metrics()` reduces them."""

    def __init__(self, model, num_experts: int, topk: int, capacity_factor):
        from .routing_replay import local_routers

        self.routers = local_routers(model)
        for _, r in self.routers:  # aux loss x micro-batch tokens; the update divides by the step's (module docstring)
            r.calculate_per_token_loss = True
        self.num_experts, self.topk, self.capacity = num_experts, topk, capacity_factor
        self.collecting = False
        self._reset()
        for layer, r in self.routers:
            r.register_forward_hook(self._hook(layer))

    def _reset(self):
        self.counts = {layer: torch.zeros(self.num_experts, dtype=torch.float64) for layer, _ in self.routers}
        self.dropped = 0.0

    def _hook(self, layer):
        def hook(_mod, _inp, out):
            if not self.collecting:
                return
            routing_map = out[1].detach()
            self.counts[layer] += routing_map.sum(0).cpu().double()
            self.dropped += float(routing_map.shape[0] * self.topk - routing_map.sum())
        return hook

    @contextlib.contextmanager
    def collect(self, aux_scale: float):
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self._reset()
        clear_aux_losses_tracker()
        self.collecting = True
        try:
            with aux_loss_scale(aux_scale):
                yield
        finally:
            self.collecting = False

    def metrics(self, num_layers: int, moe_layers: list, num_microbatches: int) -> dict:
        """Collective over all ranks: each adds its own layers' counts (sequence-parallel shards and DP/EP ranks
        see disjoint tokens, pipeline stages disjoint layers)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        table = torch.zeros(num_layers, self.num_experts + 1, dtype=torch.float64)
        for layer, c in self.counts.items():
            table[layer, :-1] = c
        table[0, -1] = self.dropped
        trackers = get_moe_layer_wise_logging_tracker()  # by moe_router_load_balancing_type
        tracker = next((trackers[k] for k in ("load_balancing_loss", "seq_load_balancing_loss") if k in trackers), None)
        aux = torch.zeros(num_layers, dtype=torch.float64)
        if tracker is not None:
            aux += tracker["values"].detach().cpu().double()
        dist.all_reduce(table)
        dist.all_reduce(aux)  # stages hold disjoint layers; every DP/TP rank its own micro-batches' values
        # megatron's per-rank values are partial sums over sequence-parallel shards: sum over TP, mean over DP
        aux /= ps.get_data_parallel_world_size() * max(num_microbatches, 1)
        out = expert_load_metrics({i: table[i, :-1] for i in moe_layers},
                                  float(table[0, -1]) if self.capacity is not None else None)
        if tracker is not None:
            out["moe/aux_loss"] = float(aux[moe_layers].mean())
        return out
