"""The LM head only where a response token is predicted.

A forward pre-hook on megatron's `output_layer` (the last pipeline stage's ColumnParallelLinear) keeps only the
hidden states at `index` (positions flattened in megatron's [s, b] order) and hands them on as [N, 1, h]. GPTModel
then returns [1, N, V_local] logits: its `transpose(0, 1).contiguous()` is a no-op on that shape (no copy), and the
prompt and padding positions never reach the head, the log-prob pass or their backward. The hook keeps the
module tree (and so every state-dict key) unchanged. Each TP rank selects the same rows of its replicated input,
and the layer's input gradient is reduced across TP as usual. With sequence parallelism (`parallel.sequence_parallel`,
on by default at TP > 1) the input is sequence-sharded: the hook gathers it first (backward: this rank's slice of the
gradient) and the layer runs that call as plain TP (its input copy sums the gradient over TP), then gets its setting
back. Under SP each micro-batch's sequence is padded to a multiple of TP (`packing.sequence_multiple`); the padded
positions are never in `index`.
"""
from typing import Optional

import torch


class ResponseHead:
    def __init__(self, output_layer):
        self.sequence_parallel = bool(getattr(output_layer, "sequence_parallel", False))
        self.index: Optional[torch.Tensor] = None
        self._handle = output_layer.register_forward_pre_hook(self._select, with_kwargs=True)
        self._restore_handle = output_layer.register_forward_hook(self._restore) if self.sequence_parallel else None

    def _select(self, module, args, kwargs):
        if self.index is None:
            return None
        hidden = args[0]
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            module.sequence_parallel = False
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index.to(hidden.device))
        return (picked.unsqueeze(1), *args[1:]), kwargs

    def _restore(self, module, args, output):
        module.sequence_parallel = self.sequence_parallel

    def remove(self):
        self._handle.remove()
        if self._restore_handle is not None:
            self._restore_handle.remove()
