"""SGLang's sampling parameters (validated like its /generate) and the pure token-sampling function."""
from dataclasses import dataclass, fields
from typing import Optional

import torch

# Sampling options SGLang accepts that this engine does not implement: allowed only at their neutral value.
_NEUTRAL_PARAMS = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                   "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
                   "logit_bias": None, "custom_params": None, "stop_regex": None}
_IGNORED_PARAMS = {"spaces_between_special_tokens", "stream_interval"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """SGLang's sampling_params subset. `top_k=-1` / `top_p=1` disable filtering; `temperature=0` is greedy."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple = ()
    stop_token_ids: tuple = ()
    n: int = 1
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: Optional[int] = None

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        """Validate a JSON sampling_params dict; raise ValueError naming the bad field. None means the default."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if value is None or key in _IGNORED_PARAMS:
                continue
            if key in _NEUTRAL_PARAMS:
                if value != _NEUTRAL_PARAMS[key]:
                    raise ValueError(f"sampling_params.{key}={value!r} is not supported by the embedded engine "
                                     f"(only {_NEUTRAL_PARAMS[key]!r}); use a real SGLang server for it")
                continue
            if key not in names:
                raise ValueError(f"unknown sampling_params field {key!r}; supported: {sorted(names)}")
            kwargs[key] = value
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        for key in set(kwargs) & {"stop", "stop_token_ids"}:
            if not isinstance(kwargs[key], (list, tuple)):
                raise ValueError(f"sampling_params.{key} must be a list, got {kwargs[key]!r}")
            kwargs[key] = tuple(kwargs[key])
        params = cls(**kwargs)
        params._check()
        return params

    def _check(self):
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", _is_num(self.temperature) and 0 <= self.temperature < float("inf"), ">= 0"),
            ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _is_int(self.top_k) and (self.top_k >= 1 or self.top_k == -1), "-1 (off) or >= 1"),
            ("n", _is_int(self.n) and self.n >= 1, "an integer >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "a list of ids >= 0"),
            ("sampling_seed", self.sampling_seed is None or _is_int(self.sampling_seed), "an integer"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"sampling_params.{name}={getattr(self, name)!r}: must be {expected}")


def sample_tokens(logits, temperature, top_p, top_k, uniform):
    """Sample one token per row by inverse CDF on `uniform` in [0, 1).

    logits [B, V] float; temperature, top_p [B] float; top_k [B] long (<= 0: off); uniform [B].
    Returns (tokens [B], logprobs [B]) with logprobs = log_softmax(logits / T)[token] (T = 1 for greedy rows),
    taken before top-p/top-k renormalisation. Greedy rows (temperature 0) take the argmax (lowest id on ties).
    """
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)
    x = logits.float()
    if not bool((temp == 1).all()):
        x = x / temp[:, None]
    row_max = torch.amax(x, dim=-1, keepdim=True)  # not max(dim): that also finds indices, ~20x slower on CPU
    weights = torch.sub(x, row_max).exp_()  # unnormalised probabilities: the one [B, V] buffer written
    z = weights.sum(dim=-1, keepdim=True)
    log_z = z.log()
    top_k = torch.where(greedy, torch.ones_like(top_k), top_k)
    filtered = (top_k > 0) | (top_p < 1)
    if not bool(filtered.any()):  # no filtering: CDF in vocabulary order, no sort needed
        tokens = _inverse_cdf(weights, uniform)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        plain = ~filtered
        if plain.any():
            tokens[plain] = _inverse_cdf(weights[plain], uniform[plain])
        probs = weights[filtered] / z[filtered]
        p_sorted, order = probs.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(p_sorted.shape[-1], device=logits.device)
        k = top_k[filtered]
        keep = (k[:, None] <= 0) | (ranks[None] < k[:, None])
        keep &= (p_sorted.cumsum(-1) - p_sorted) < top_p[filtered][:, None]  # mass before a token < top_p
        pick = _inverse_cdf(p_sorted * keep, uniform[filtered])
        tokens[filtered] = order.gather(1, pick[:, None])[:, 0]
    logprobs = x.gather(1, tokens[:, None]) - row_max - log_z  # log_softmax(logits / T)[token]
    return tokens, logprobs[:, 0]


def _inverse_cdf(weights, uniform, block: int = 256):
    """The first index whose cumulative weight exceeds uniform x total (never a zero-weight index).

    Over a large vocabulary in two levels: the CDF of block sums picks the block, then the CDF inside that one
    block picks the token, instead of a cumulative sum over the whole [B, V] (which cost more than the rest of
    the sampler on CPU at V = 32k).
    """
    rows, v = weights.shape
    if v < 16 * block:
        cdf = weights.cumsum(-1)
        target = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=v - 1)
    nb = -(-v // block)
    padded = weights if v % block == 0 else torch.nn.functional.pad(weights, (0, nb * block - v))
    blocks = padded.view(rows, nb, block)
    block_cdf = blocks.sum(-1).cumsum(-1)
    target = uniform.to(block_cdf.dtype) * block_cdf[:, -1]
    b = torch.searchsorted(block_cdf, target[:, None], right=True)[:, 0].clamp(max=nb - 1)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(target))
    inner = blocks[torch.arange(rows, device=weights.device), b].cumsum(-1)  # [B, block]
    # the block's own cumulative sum can round below its sum: keep the residual strictly inside it
    rest = torch.minimum(target - before, torch.nextafter(inner[:, -1], torch.zeros_like(target)))
    j = torch.searchsorted(inner, rest.clamp(min=0)[:, None], right=True)[:, 0].clamp(max=block - 1)
    return (b * block + j).clamp(max=v - 1)
