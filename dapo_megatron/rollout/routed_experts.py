"""The embedded engine's record of the experts its HF MoE model routed each token to (R3 routing replay).

Like SGLang's `--enable-return-routed-experts` + per-request `return_routed_experts`: the answer's
`meta_info.routed_experts` is base64 of int32 [prompt + output - 1, num_hidden_layers, num_experts_per_tok], one row
per token fed through the model (the prompt in prefill, then every output token but the last, which is never fed);
dense layers (`mlp_only_layers`) hold -1. Forward hooks on the HF gate modules (`mlp.gate`, which return
(logits, scores, top-k indices)) capture each forward's indices; the engine slices them per sequence.
"""
import base64
import re
from typing import Optional

import torch

_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate$")


class RoutingRecorder:
    """Captures the top-k expert indices of every MoE gate during one forward ([tokens, num_layers, topk])."""

    def __init__(self, model):
        cfg = model.config
        self.topk = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
        self.num_layers = int(cfg.num_hidden_layers)
        self._step: dict = {}
        self._hooks = []
        for name, mod in model.named_modules():
            m = _GATE.match(name)
            if m and self.topk and hasattr(mod, "top_k"):
                self._hooks.append(mod.register_forward_hook(self._hook(int(m.group(1)))))

    @property
    def enabled(self) -> bool:
        return bool(self._hooks)

    def _hook(self, layer: int):
        def hook(_mod, _inp, out):
            self._step[layer] = out[2].detach().to(torch.int32).cpu()
        return hook

    def take(self, num_tokens: int) -> Optional[torch.Tensor]:
        """The last forward's routing, [num_tokens, num_layers, topk] (-1 for dense layers); None without MoE."""
        if not self.enabled:
            return None
        out = torch.full((num_tokens, self.num_layers, self.topk), -1, dtype=torch.int32)
        for layer, idx in self._step.items():
            out[:, layer] = idx.reshape(num_tokens, self.topk)
        self._step = {}
        return out


def encode(rows: list, num_tokens: int) -> str:
    """Base64 (SGLang's wire format) of the first `num_tokens` rows of the per-forward routing pieces."""
    t = torch.cat(rows)[:num_tokens] if rows else torch.empty(0, dtype=torch.int32)
    return base64.b64encode(t.to(torch.int32).contiguous().numpy().tobytes()).decode("ascii")
