"""Micro-batch layout of the actor: token-balanced partitions and padding-free (or padded) micro-batches.

Pure functions of the samples, so every rank computes the same layout without communication:
  * `karmarkar_karp`: deterministic k-way balanced partition by tokens (largest differencing, as slime / AReaL).
  * `dp_partition`: which samples each data-parallel rank trains on.
  * `microbatch_groups`: each rank's samples split into micro-batches; every rank gets the same count (the
    pipeline schedule runs one count per step), balanced by tokens within a token budget.
  * `pack_microbatch`: the tensors of one micro-batch.

Layout of a micro-batch. The model input is either packed ([1, T]: sequences end to end, `cu_seqlens` in a THD
`PackedSeqParams`, RoPE positions restarting per sequence) or padded ([B, S], right-padded). The LM head runs only
on `head_index`: the positions, flattened in megatron's [s, b] order, whose logits predict a response token, so
the logits come back as [1, N, V_local] with no transpose copy. Everything the loss reads is in the response-major
[B, R] layout (R = longest response of the micro-batch): per-token fields (`TOKEN_FIELDS`, any list of per-sample
per-token values) and per-sample scalars broadcast over the response (`SAMPLE_FIELDS`). `rows`/`cols` map the N
head positions to [B, R]. Both input layouts give identical [B, R] tensors, which is what makes them comparable.
"""
import heapq
import math
from typing import Callable, Optional

import torch

from ..types import Sample

# Per-token fields: name -> getter(sample) returning one value per response token (None: zeros). Add a field here
# (or pass `token_fields=`) and it is packed like the others, e.g. reference log-probs for a KL term.
TOKEN_FIELDS: dict[str, Callable[[Sample], Optional[list]]] = {
    "loss_mask": lambda s: s.loss_mask if s.loss_mask is not None else [1] * len(s.response_ids),
    "old_logprobs": lambda s: (s.metadata["old_logprobs"] if s.metadata.get("old_logprobs") is not None
                               else s.rollout_logprobs),
    "rollout_logprobs": lambda s: s.rollout_logprobs,
}
SAMPLE_FIELDS: dict[str, Callable[[Sample], float]] = {
    "advantages": lambda s: float(s.metadata.get("advantage", 0.0)),
}


def register_token_field(name: str, getter: Callable[[Sample], Optional[list]]) -> None:
    """Pack `getter(sample)` (one value per response token) into every micro-batch as `mb[name]` ([B, R])."""
    TOKEN_FIELDS[name] = getter


def seq_len(s: Sample) -> int:
    return len(s.prompt_ids) + len(s.response_ids)


def sequence_multiple(pad_to_multiple_of: int, tp: int, sequence_parallel: bool) -> int:
    """What each micro-batch's sequence dimension is padded to a multiple of: megatron's sequence parallelism
    splits it evenly over the TP ranks (packed: the THD token count; padded: S of [B, S])."""
    return math.lcm(pad_to_multiple_of, tp) if sequence_parallel else pad_to_multiple_of


# ---- balancing ----------------------------------------------------------------------------------------------
def karmarkar_karp(weights: list[int], k: int) -> list[list[int]]:
    """Indices of `weights` in k parts of near-equal sums (largest differencing method), deterministic.

    Parts are returned with their indices ascending, ordered by their first index; a part is empty only when
    there are fewer than k weights.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    heap, tie = [], 0
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        parts = [(weights[i], [i])] + [(0, []) for _ in range(k - 1)]
        heap.append((-weights[i], tie, parts))
        tie += 1
    heapq.heapify(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # the heaviest part of one state meets the lightest of the other (both kept sorted heaviest first)
        merged = sorted(((sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))),
                        key=lambda p: (-p[0], min(p[1], default=-1)))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    parts = [sorted(items) for _, items in heap[0][2]] if heap else [[] for _ in range(k)]
    return sorted(parts, key=lambda p: (not p, p[0] if p else 0))


def dp_partition(lengths: list[int], dp_size: int) -> list[list[int]]:
    """The sample indices each data-parallel rank trains on, balanced by tokens (every rank computes the same)."""
    if dp_size == 1:
        return [list(range(len(lengths)))]
    return karmarkar_karp(lengths, dp_size)


def _cost(lengths: list[int], packed: bool, multiple: int) -> int:
    if packed:
        return sum(lengths)
    return len(lengths) * (-(-max(lengths, default=0) // multiple) * multiple)


def microbatch_groups(per_rank: list[list[int]], *, micro_batch_size: int, budget: Optional[int] = None,
                      packed: bool = True, multiple: int = 8) -> list[list[list[int]]]:
    """Split each rank's sequence lengths into the same number of micro-batches (positions into its list).

    With `budget` (tokens per micro-batch; padded tokens count x longest for the padded layout), the count is the
    smallest that lets a token-balanced split fit it on every rank; a sequence longer than the budget gets a
    micro-batch of its own. Without it, consecutive groups of at most `micro_batch_size`. A rank with fewer
    sequences than micro-batches gets empty groups (the caller runs them as zero-loss dummies).
    """
    if budget is None:
        count = max(max(-(-len(r) // micro_batch_size) for r in per_rank), 1)
        return [[list(range(len(r) * g // count, len(r) * (g + 1) // count)) for g in range(count)]
                for r in per_rank]
    count = max(max(-(-_cost(r, packed, multiple) // budget) for r in per_rank), 1)
    most = max(max(len(r) for r in per_rank), 1)
    while True:
        groups = [karmarkar_karp(r, count) for r in per_rank]
        fits = all(len(g) <= 1 or _cost([r[i] for i in g], packed, multiple) <= budget
                   for r, gs in zip(per_rank, groups) for g in gs)
        if fits or count >= most:
            return groups
        count += 1


# ---- one micro-batch ----------------------------------------------------------------------------------------
def pack_microbatch(samples: list[Sample], pad_id: int, multiple: int, packed: bool = True,
                    token_fields: Optional[dict] = None, sample_fields: Optional[dict] = None) -> dict:
    """The tensors of one micro-batch (see the module docstring). An empty list gives a zero-loss dummy."""
    token_fields = TOKEN_FIELDS if token_fields is None else token_fields
    sample_fields = SAMPLE_FIELDS if sample_fields is None else sample_fields
    dummy = not samples
    if dummy:  # a rank with fewer samples than micro-batches still runs the schedule's forward and backward
        samples = [Sample(prompt_ids=[pad_id], response_ids=[pad_id], rollout_logprobs=[0.0], loss_mask=[0])]
    B = len(samples)
    lengths = [seq_len(s) for s in samples]
    R = max(max(len(s.response_ids) for s in samples), 1)
    rows, cols, head, targets = [], [], [], []
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        rows += [i] * r
        cols += range(r)
        targets += s.response_ids
        # the logits at position p - 1 + j predict response token j
        offset = sum(lengths[:i]) if packed else 0
        head += [(offset + p - 1 + j) if packed else (p - 1 + j) * B + i for j in range(r)]
    mb = {"rows": torch.tensor(rows, dtype=torch.long), "cols": torch.tensor(cols, dtype=torch.long),
          "head_index": torch.tensor(head, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
          "lengths": lengths, "response_lengths": [len(s.response_ids) for s in samples], "dummy": dummy}
    for name, get in token_fields.items():
        t = torch.zeros(B, R)
        for i, s in enumerate(samples):
            values = get(s)
            if values is not None and len(s.response_ids):
                t[i, :len(s.response_ids)] = torch.tensor(values[:len(s.response_ids)], dtype=torch.float)
        mb[name] = t
    valid = torch.arange(R).unsqueeze(0) < torch.tensor(mb["response_lengths"]).unsqueeze(1)
    for name, get in sample_fields.items():
        mb[name] = torch.tensor([get(s) for s in samples], dtype=torch.float).unsqueeze(1) * valid
    mb.update(_packed_inputs(samples, lengths, pad_id, multiple) if packed
              else _padded_inputs(samples, lengths, pad_id, multiple))
    return mb


def _padded_inputs(samples, lengths, pad_id, multiple) -> dict:
    seq = -(-max(lengths) // multiple) * multiple
    tokens = torch.full((len(samples), seq), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, :lengths[i]] = torch.tensor(list(s.prompt_ids) + list(s.response_ids))
    pos = torch.arange(seq).unsqueeze(0).expand(len(samples), -1).contiguous()
    return {"tokens": tokens, "position_ids": pos, "cu_seqlens": None, "max_seqlen": seq}


def _packed_inputs(samples, lengths, pad_id, multiple) -> dict:
    total = sum(lengths)
    T = -(-total // multiple) * multiple
    ids = [t for s in samples for t in (*s.prompt_ids, *s.response_ids)] + [pad_id] * (T - total)
    pos = [j for n in lengths for j in range(n)] + list(range(T - total))
    seqlens = lengths + ([T - total] if T > total else [])  # the tail padding is a sequence of its own
    cu = torch.tensor([0] + seqlens).cumsum(0).to(torch.int32)
    return {"tokens": torch.tensor([ids], dtype=torch.long), "position_ids": torch.tensor([pos], dtype=torch.long),
            "cu_seqlens": cu, "max_seqlen": max(seqlens)}


def packed_seq_params(mb: dict, device):
    """megatron's THD `PackedSeqParams` of a packed micro-batch (None for the padded layout)."""
    if mb["cu_seqlens"] is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb["cu_seqlens"].to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=mb["max_seqlen"],
                           max_seqlen_kv=mb["max_seqlen"])


def to_rows(flat: torch.Tensor, mb: dict) -> torch.Tensor:
    """Per-head-position values [N] -> the response-major [B, R] layout (zeros elsewhere; differentiable)."""
    out = flat.new_zeros(mb["loss_mask"].shape)
    return out.index_put((mb["rows"].to(flat.device), mb["cols"].to(flat.device)), flat)
