"""Sequence parallelism with torch's RMSNorm (CPU: no apex, no Transformer Engine).

megatron-core's WrappedTorchNorm refuses a config with `sequence_parallel` (it asserts at build). The norm itself
needs nothing special: under SP each TP rank normalises its own slice of the sequence, and only the weight's
gradient, a partial sum over that slice, must be summed over the TP group. megatron's `finalize_model_grads` does
that for every parameter tagged `sequence_parallel=True` when the config has sequence parallelism on, so the specs
below build torch's norm directly and tag its weight. q/k norms act on heads after the QKV projection has gathered
the sequence: their gradients are already complete, so they stay untagged.
"""
import dataclasses


class TorchRMSNorm:
    """torch RMSNorm built whatever the config's sequence_parallel says (q/k norms act on heads, not tokens)."""

    tag_sequence_parallel = False

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        import torch

        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = cls.tag_sequence_parallel
        return norm


class SequenceParallelRMSNorm(TorchRMSNorm):
    """torch RMSNorm over a sequence-parallel shard: weights tagged `sequence_parallel` (grads summed over TP)."""

    tag_sequence_parallel = True


def sequence_parallel_layer_spec(layer_spec):
    """A local-spec TransformerLayer spec whose token norms are `SequenceParallelRMSNorm`."""
    from megatron.core.transformer.identity_op import IdentityOp

    attn = layer_spec.submodules.self_attention
    qk = {k: TorchRMSNorm for k in ("q_layernorm", "k_layernorm") if getattr(attn.submodules, k) is not IdentityOp}
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, **qk))
    sub = dataclasses.replace(layer_spec.submodules, input_layernorm=SequenceParallelRMSNorm,
                              pre_mlp_layernorm=SequenceParallelRMSNorm, self_attention=attn)
    return dataclasses.replace(layer_spec, submodules=sub)
