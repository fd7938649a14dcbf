"""Padding-free (THD) attention for megatron-core's local, CPU layer spec.

megatron-core's `DotProductAttention` refuses `packed_seq_params`; Transformer Engine's attention takes them on GPU.
On CPU the actor still packs sequences end to end ([t, 1, h], one `cu_seqlens`), and this subclass runs the local
causal attention once per sequence: attention stays inside each sequence, the cost is sum(s_i^2), not t^2, and the
numbers are those of the padded layout (the same kernels on the same rows). RoPE positions already restart per
sequence: megatron's attention applies it with `cu_seqlens` before calling the core attention.

The causal mask is built here on the query's device: megatron's default one is created with device="cuda", which
the CPU shim rewrites only on the thread that entered it, not inside a recompute backward (activation checkpoint).
"""
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def _causal_mask(q):
    sq = q.shape[0]
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool, device=q.device), diagonal=1) if sq > 1 else None


class PackedDotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            if attention_mask is None and self.attn_mask_type == AttnMaskType.causal:
                attention_mask = _causal_mask(query)
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention supports qkv_format='thd', got {packed_seq_params.qkv_format!r}")
        # THD: query [t, np, hn], key/value [t, ng, hn]; each sequence becomes a batch of one, [s_i, 1, n, hn].
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        outs = [super(PackedDotProductAttention, self).forward(
                    query[a:b].unsqueeze(1), key[a:b].unsqueeze(1), value[a:b].unsqueeze(1), _causal_mask(query[a:b]),
                    attn_mask_type=attn_mask_type)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(outs, dim=0)  # [t, 1, hp]; attention.py reshapes it to [t, 1, h]
