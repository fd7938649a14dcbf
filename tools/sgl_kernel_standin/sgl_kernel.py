"""Test fixture, never part of dapo_megatron: a pure-torch stand-in for the `sgl_kernel` CPU extension, so that the
PyPI sglang server runs on a machine without CUDA (PyPI ships only CUDA builds of sgl-kernel, with no sdist).

With SGLANG_USE_CPU_ENGINE=1 sglang imports two names from it at module level; their semantics are read from sglang's
own Triton kernels that do the same job on GPU (`copy_all_layer_kv_cache_tiled` in
sglang/kernels/ops/kvcache/cache_move.py, `assign_req_to_token_pool` in sglang/srt/mem_cache/allocation.py) and the
CPU kernels' argument lists at the call sites. Any other name imports as a function whose call raises
NotImplementedError: sglang then runs its
torch_native attention and forward_native layers, which need nothing from here. tools/setup_sglang_cpu.sh puts this
folder on the tools venv's path.
"""
import ctypes

import torch

_PROVIDED = ("copy_all_layer_kv_cache_cpu", "assign_req_to_token_pool_cpu")


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor,
                                src_loc: torch.Tensor) -> None:
    """For every buffer b (base address data_ptrs[b], one row = strides[b] bytes): row tgt_loc[i] = row src_loc[i].
    All source rows are read before any is written, so overlapping src/tgt sets copy the old rows (the GPU kernel
    loads a whole tile of rows before it stores)."""
    src = [int(x) for x in src_loc.tolist()]
    tgt = [int(x) for x in tgt_loc.tolist()]
    if len(src) != len(tgt):
        raise ValueError(f"src_loc has {len(src)} rows, tgt_loc {len(tgt)}")
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        base, stride = int(base), int(stride)
        rows = [ctypes.string_at(base + s * stride, stride) for s in src]
        for t, row in zip(tgt, rows):
            ctypes.memmove(base + t * stride, row, stride)


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:
    """Request i gets KV slots out_cache_loc[o_i : o_i + n_i] at positions [start_i, end_i) of its row
    req_to_token[req_pool_indices[i]], where n_i = end_i - start_i and o_i is the sum of n_j over j < i."""
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len {pool_len} != req_to_token row length {req_to_token.shape[1]}")
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[offset:offset + n].to(req_to_token.dtype)
        offset += n


def __getattr__(name: str):
    """sglang imports speculative-decoding `*_cpu` kernels by name at module level: the import succeeds, a call
    raises."""
    if name.startswith("__"):  # import machinery probes (__path__, __spec__ ...) must see a plain module
        raise AttributeError(name)

    def not_provided(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: the CPU test stand-in (tools/sgl_kernel_standin) provides "
                                  f"only {', '.join(_PROVIDED)}")
    not_provided.__name__ = name
    return not_provided
