"""Run megatron-core on CPU (gloo). Every shim megatron-core needs when no GPU is present lives here.

`enable()` is called by `dapo_megatron.parallel.initialize` only when `torch.cuda.is_available()` is False, so
none of this touches a GPU run. Each shim names the megatron-core call that needs it.
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # An int device is a CUDA ordinal (from torch.cuda.current_device()).
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA devices to CPU in every torch call.

    megatron-core hard-codes `device="cuda"` / `torch.cuda.current_device()` in ~150 places: the causal attention
    mask, GlobalMemoryBuffer, the pipeline schedules' token counts, optimizer `found_inf`, grad-norm buffers, the
    rerun state machine. It also classifies params with `tensor.type() == "torch.cuda.FloatTensor"`
    (optimizer/optimizer.py, distrib_optimizer.py, clip_grads.py), so `Tensor.type()` answers with the CUDA name.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) and not isinstance(a, torch.Tensor) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


def _cpu_rng_state(*_, **__):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *_, **__):
    torch.set_rng_state(state)


def _tracker_add(self, name, seed):
    # CudaRNGStatesTracker.add reads/writes torch.cuda RNG state; keep a CPU generator state per name instead.
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)
    self._is_initialized = True


def _split_sizes_to_host(tensor, as_numpy=False, record_stream=False):
    # MoE alltoall dispatcher: megatron converts split sizes to numpy only when they sit on a GPU; on CPU they stay
    # tensors, which all_to_all_single's split-size arguments reject.
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _uneven_collectives(mappings):
    """gloo's all_gather / reduce_scatter need equal sizes; the MoE dispatcher at TP > 1 splits tokens unevenly."""
    import torch.distributed as dist

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)], dim=0)

    def scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return list(torch.split(total, input_split_sizes, dim=0))[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven


def enable():
    """Install the CPU shims (idempotent). Only valid when no GPU is present."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.enable() must not be used on a machine with a GPU")
    from megatron.core.tensor_parallel import random as mrandom

    # tensor_parallel.random: model_parallel_cuda_manual_seed / CudaRNGStatesTracker.fork use the CUDA generator.
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    torch.cuda.manual_seed = torch.manual_seed  # model_parallel_cuda_manual_seed seeds the default state
    torch.cuda.get_rng_state = torch.get_rng_state  # get_all_rng_states / checkpointed RNG state
    # Schedules, timers and the p2p communicator synchronise streams; there are none on CPU.
    torch.cuda.synchronize = lambda *_, **__: None
    # ~120 call sites use torch.cuda.current_device() as a device argument; "cpu" is a valid one.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.set_device = lambda *_, **__: None
    torch.cuda.device_count = lambda: 0
    # The pipeline schedules and DDP use torch.cuda.Stream / current_stream for overlap.
    torch.cuda.current_stream = lambda *_, **__: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *_, **__: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = lambda *_, **__: None
    torch.cuda.nvtx.range_pop = lambda *_, **__: None
    # Memory statistics queried by logging utilities.
    torch.cuda.memory_allocated = lambda *_, **__: 0
    torch.cuda.max_memory_allocated = lambda *_, **__: 0
    from megatron.core.transformer.moe import token_dispatcher

    from megatron.core.tensor_parallel import mappings

    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_host
    _uneven_collectives(mappings)
    _CudaToCpu().__enter__()
    _ENABLED = True


class _NullStream:
    def __init__(self, *_, **__):
        pass

    def wait_stream(self, *_):
        pass

    def synchronize(self):
        pass

    def record_event(self, *_):
        return _NullStream()  # an "event" whose synchronize() is a no-op (MoE alltoall dispatcher waits on it)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False
