"""The LM head only where a response token is predicted.

A forward pre-hook on megatron's `output_layer` (the last pipeline stage's ColumnParallelLinear) keeps only the
hidden states at `index` (positions flattened in megatron's [s, b] order) and hands them on as [N, 1, h]. GPTModel
then returns [1, N, V_local] logits: its `transpose(0, 1).contiguous()` is a no-op on that shape (no copy), and the
prompt and padding positions never reach the head, the log-prob pass or their backward. The hook keeps the
module tree (and so every state-dict key) unchanged. Each TP rank selects the same rows of its replicated input,
and the layer's input gradient is reduced across TP as usual.
"""
from typing import Optional

import torch


class ResponseHead:
    def __init__(self, output_layer):
        if getattr(output_layer, "sequence_parallel", False):
            # the head's input is sequence-sharded there: selecting rows would need a gather first
            raise NotImplementedError("the response-only LM head does not support sequence_parallel")
        self.index: Optional[torch.Tensor] = None
        self._handle = output_layer.register_forward_pre_hook(self._select, with_kwargs=True)

    def _select(self, module, args, kwargs):
        if self.index is None:
            return None
        hidden = args[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index.to(hidden.device))
        return (picked.unsqueeze(1), *args[1:]), kwargs

    def remove(self):
        self._handle.remove()
