"""The engine's running batch: rows, their left-padded KV cache (a transformers DynamicCache), mask and pending
tokens, and the row operations continuous batching needs (merge a newly prefilled batch, drop finished rows)."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class _Batch:
    """Running rows: a left-padded KV cache ([B, heads, T, dim] per layer), its mask [B, T] and pending tokens."""
    rows: list
    cache: object  # transformers DynamicCache, grown in place by each decode step
    mask: torch.Tensor
    next_pos: torch.Tensor  # position id of each row's pending token
    pending: torch.Tensor  # last sampled token of each row, not yet in the cache


def _kv_of(cache) -> list:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def _make_cache(kv):
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(kv)) if kv else DynamicCache()


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """Concatenate two batches along rows, left-padding the shorter cache."""
    ta, tb = a.mask.shape[1], b.mask.shape[1]
    t = max(ta, tb)

    def pad(x, have):  # left-pad dim -2 (time) of [B, H, T, D]
        return F.pad(x, (0, 0, t - have, 0))

    kv = [(torch.cat([pad(ka, ta), pad(kb, tb)]), torch.cat([pad(va, ta), pad(vb, tb)]))
          for (ka, va), (kb, vb) in zip(_kv_of(a.cache), _kv_of(b.cache))]
    mask = torch.cat([F.pad(a.mask, (t - ta, 0)), F.pad(b.mask, (t - tb, 0))])
    return _Batch(a.rows + b.rows, _make_cache(kv), mask, torch.cat([a.next_pos, b.next_pos]),
                  torch.cat([a.pending, b.pending]))


def _select(b: _Batch, keep: list) -> Optional[_Batch]:
    """Keep rows `keep` and drop the cache columns that became padding for every remaining row."""
    if not keep:
        return None
    idx = torch.tensor(keep, device=b.mask.device)
    mask = b.mask[idx]
    lead = int((mask.cumsum(-1) == 0).sum(-1).min())
    kv = [(k[idx, :, lead:], v[idx, :, lead:]) for k, v in _kv_of(b.cache)]
    return _Batch([b.rows[i] for i in keep], _make_cache(kv), mask[:, lead:], b.next_pos[idx], b.pending[idx])


def _refill(forward, rows: list, pad_id: int, device) -> _Batch:
    """`rows` again, their KV cache recomputed by the current weights (SGLang's retract: a request paused across a
    weight update continues over a cache of the new weights): prompt and output tokens but the pending last one."""
    seqs = [r.req.prompt_ids + r.output_ids[:-1] for r in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.tensor(seq, device=device)
        mask[i, width - len(seq):] = 1
    cache = _make_cache([])
    forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
    pending = torch.tensor([r.output_ids[-1] for r in rows], device=device)
    return _Batch(list(rows), cache, mask, mask.sum(-1), pending)
