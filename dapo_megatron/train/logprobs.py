"""Per-token log-prob (and entropy) of target tokens from vocab-parallel logits, without an fp32 [tokens, vocab].

Megatron-core's output layer leaves logits split over the vocabulary: tensor-parallel rank r holds the columns
[r * V_local, (r + 1) * V_local). The softmax statistics (max, sum of exp, target logit, sum of p * logit) are
reduced across the TP group; each rank only ever holds a [chunk_size, V_local] fp32 slice. The backward recomputes
the softmax chunk by chunk from the saved logits and the per-token statistics, so it needs no communication and
writes the gradient straight into a tensor of the logits' dtype.

With `vocab_size` (the real vocabulary) the padded columns of megatron's padded vocabulary
(make_vocab_size_divisible_by) are excluded: their logits count as -inf, so they change no log-prob, entropy or softmax normaliser and get zero
gradient. Without it every column counts. A target id outside [0, vocab) (e.g. -100 on padding) yields -logsumexp,
never an error: mask it.

With `overwrite_logits` (the caller is done with the logits), fp32 logits and no entropy gradient, the forward keeps
exp(x - max) in the logits' own buffer and the backward turns it into the gradient in place, as megatron-core's
vocab-parallel cross entropy does: no recompute of the softmax and no new [tokens, vocab] buffer (measured on CPU:
see BENCHMARKS.md section 1). The logits' version counter moves, so autograd refuses any other backward that saved
them.
"""
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _resolve_tp_group(tp_group):
    """The explicit group, else megatron's TP group if megatron initialised one, else None (TP = 1)."""
    if tp_group is not None:
        return tp_group
    # Only look at megatron if something already imported it: if not, it cannot have been initialised.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _shift_in_place(x, local_target, on_rank, group, temperature, n_valid):
    """Scale x (fp32 [chunk, V_local], in place) by 1/T, mask the padded columns and subtract the row max (reduced
    across TP). Returns (target logit before the shift, 0 where the target is on another rank; row max)."""
    if temperature != 1.0:
        x.div_(temperature)
    x[:, n_valid:] = float("-inf")  # padded vocabulary columns (none without vocab_size)
    target_logit = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(on_rank, target_logit, torch.zeros_like(target_logit))  # not x 0: -inf x 0 is nan
    row_max = _all_reduce(torch.amax(x, dim=-1), dist.ReduceOp.MAX, group)  # amax: ~20x max(dim) on CPU
    x.sub_(row_max.unsqueeze(-1))
    return target_logit, row_max


def _finish(stats, row_max, group):
    """[sum of exp, target logit(, sum of exp x)] reduced across TP -> (logprob, entropy or None, log Z, Z)."""
    stats = _all_reduce(torch.stack(stats), dist.ReduceOp.SUM, group)
    log_z = torch.log(stats[0])
    entropy = log_z - stats[2] / stats[0] if len(stats) == 3 else None  # H = log Z - E_p[x]
    return (stats[1] - row_max) - log_z, entropy, log_z, stats[0]


def _forward_chunk(logits, local_target, on_rank, group, temperature, compute_entropy, n_valid):
    """Softmax statistics of one chunk of tokens: (logprob, entropy or None, max + logsumexp) per token.

    A function of its own so that the chunk's two [chunk, V_local] fp32 buffers are freed on return, before the next
    chunk allocates (a loop body would keep the previous chunk's buffers alive: 3 buffers at peak instead of 2).
    """
    x = logits.to(torch.float32, copy=True)
    target_logit, row_max = _shift_in_place(x, local_target, on_rank, group, temperature, n_valid)
    exp_x = torch.exp(x)
    stats = [exp_x.sum(dim=-1), target_logit]
    if compute_entropy:
        x[:, n_valid:] = 0.0  # -inf x 0 would be nan; exp_x is 0 there
        stats.append(x.mul_(exp_x).sum(dim=-1))  # sum_v exp(x_v) x_v, in x's buffer (x is done with)
    logprob, entropy, log_z, _ = _finish(stats, row_max, group)
    return logprob, entropy, row_max + log_z


def _backward_chunk(logits, local_target, on_rank, shift, entropy, g_lp, g_ent, temperature, n_valid):
    """fp32 gradient wrt one chunk of logits, recomputing p from the saved max + logsumexp (no communication).

    d logp_t / dx_v = 1[v == t] - p_v ;  dH / dx_v = -p_v (logp_v + H) ;  x = logits / temperature.
    """
    logp = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        logp.div_(temperature)
    logp.sub_(shift.unsqueeze(-1))
    logp[:, n_valid:] = float("-inf")
    p = torch.exp(logp)  # 0 on padded columns, so their gradient is 0
    logp[:, n_valid:] = 0.0
    if g_ent is not None:
        # -p_v (g_lp + g_H (logp_v + H)), built in the logp buffer
        grad = logp.add_(entropy.unsqueeze(-1)).mul_(g_ent.unsqueeze(-1)).add_(g_lp.unsqueeze(-1)).mul_(p).neg_()
    else:
        grad = p.mul_(-g_lp.unsqueeze(-1))
    grad.scatter_add_(-1, local_target.unsqueeze(-1), (g_lp * on_rank).unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _forward_chunk_inplace(x, local_target, on_rank, group, temperature, compute_entropy, n_valid, buf):
    """`_forward_chunk` on the logits' own buffer `x`: leaves exp(x - max) in it and returns (logprob, entropy or
    None, sum of exp). `buf` is a reused [chunk, V_local] fp32 scratch (entropy only)."""
    target_logit, row_max = _shift_in_place(x, local_target, on_rank, group, temperature, n_valid)
    if compute_entropy:
        buf = buf[: x.shape[0]]
        torch.exp(x, out=buf)
        x[:, n_valid:] = 0.0  # -inf x 0 would be nan; exp is 0 there
        stats = [buf.sum(dim=-1), target_logit, torch.mul(x, buf, out=x).sum(dim=-1)]
        x.copy_(buf)
    else:
        stats = [x.exp_().sum(dim=-1), target_logit]
    logprob, entropy, _, sum_exp = _finish(stats, row_max, group)
    return logprob, entropy, sum_exp


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, chunk_size, compute_entropy, temperature, vocab_size, inplace):
        n, v_local = logits.shape
        vocab_start = dist.get_rank(group) * v_local if group is not None else 0
        # columns of this shard inside the real vocabulary
        n_valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - vocab_start))
        # max logit + logsumexp; in place: the sum of exp(x - max)
        shift = torch.empty(n, dtype=torch.float32, device=logits.device)
        logprobs = torch.empty_like(shift)
        entropy = torch.empty_like(shift) if compute_entropy else None
        local_target = target - vocab_start
        on_rank = (local_target >= 0) & (local_target < v_local)
        local_target = torch.where(on_rank, local_target, torch.zeros_like(local_target))
        buf = torch.empty(min(chunk_size, n), v_local, device=logits.device) if inplace and compute_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            if inplace:  # shift = sum of exp here: logits[s:e] now holds exp(x - max)
                lp, ent, shift[s:e] = _forward_chunk_inplace(logits[s:e], local_target[s:e], on_rank[s:e], group,
                                                             temperature, compute_entropy, n_valid, buf)
            else:
                lp, ent, shift[s:e] = _forward_chunk(logits[s:e], local_target[s:e], on_rank[s:e], group,
                                                     temperature, compute_entropy, n_valid)
            logprobs[s:e] = lp
            if compute_entropy:
                entropy[s:e] = ent
        ctx.save_for_backward(logits, local_target, on_rank, shift, None if inplace else entropy)
        ctx.chunk_size, ctx.temperature, ctx.n_valid, ctx.inplace = chunk_size, temperature, n_valid, inplace
        if inplace and compute_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        if entropy is None:
            entropy = torch.empty(0, device=logits.device)
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, local_target, on_rank, shift, entropy = ctx.saved_tensors
        n = logits.shape[0]
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(n, device=logits.device)
        if ctx.inplace:  # logits holds exp(x - max), shift the sums of exp: the gradient is built in that buffer
            g = grad_logprobs / ctx.temperature  # d/dlogits = (1[v == t] - p_v) g / T
            grad = logits.mul_((-g / shift).unsqueeze(-1))
            grad.scatter_add_(-1, local_target.unsqueeze(-1), (g * on_rank).unsqueeze(-1))
            return grad, None, None, None, None, None, None, None
        if entropy is None:
            grad_entropy = None
        grad_logits = torch.empty_like(logits)
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            grad_logits[s:e] = _backward_chunk(
                logits[s:e], local_target[s:e], on_rank[s:e], shift[s:e],
                entropy[s:e] if grad_entropy is not None else None, grad_logprobs[s:e],
                grad_entropy[s:e] if grad_entropy is not None else None, ctx.temperature, ctx.n_valid)
        return grad_logits, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: Tensor,
    target: Tensor,
    *,
    tp_group=None,
    chunk_size: int = 1024,
    compute_entropy: bool = False,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    differentiable_entropy: bool = True,
    overwrite_logits: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """log softmax(logits / temperature)[target] and, optionally, the entropy of that distribution.

    Args:
        logits: [..., V_local], this TP rank's vocabulary shard (any float dtype; math is fp32).
        target: [...] global token ids, same leading shape as `logits`.
        tp_group: the tensor-parallel group; None uses megatron's if initialised, else TP = 1.
        chunk_size: tokens per chunk; peak extra memory is ~2 x chunk_size x V_local fp32.
        compute_entropy: also return the per-token entropy (differentiable).
        temperature: logits are divided by it first, as the rollout engine samples from softmax(logits / T);
            use the engine's sampling temperature so log-probs are comparable to the engine's.
        vocab_size: the real vocabulary (global ids >= it are megatron's padding and are masked out); None: all.
        differentiable_entropy: False returns the entropy detached (logged only, no gradient through it).
        overwrite_logits: the caller no longer needs `logits`; with fp32 logits and no entropy gradient they are
            overwritten (the in-place path of the module docstring). Other cases ignore it: their math is the same.

    Returns:
        (logprobs, entropy or None), both fp32 with the shape of `target`.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must share leading dims")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size}, {temperature}")
    group = _resolve_tp_group(tp_group)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_target = target.reshape(-1).long()
    entropy_grad = compute_entropy and differentiable_entropy
    inplace = overwrite_logits and flat_logits.dtype == torch.float32 and not entropy_grad
    logprobs, entropy = _VocabParallelLogProbs.apply(
        flat_logits, flat_target, group, chunk_size, compute_entropy, float(temperature), vocab_size, inplace)
    logprobs = logprobs.view(target.shape)
    if not compute_entropy:
        return logprobs, None
    entropy = entropy.view(target.shape)
    return logprobs, (entropy if differentiable_entropy else entropy.detach())
