"""Process groups: torch.distributed + megatron-core parallel_state in one call, and a clean teardown."""
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    """`parallel` section (Megatron names). Data parallel is what is left: world / (TP x PP x CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1  # refused > 1 (see check_supported)
    expert_model_parallel_size: int = 1  # MoE models only; carved out of data parallel (world / PP / TP / EP)
    expert_tensor_parallel_size: int | None = None  # MoE only: TP inside each expert; null = tensor_model_parallel_size
    virtual_pipeline_model_parallel_size: int | None = None  # refused (one model chunk per pipeline stage)
    # Megatron's sequence parallelism: at TP > 1 the norms, residuals and dropout of each layer hold 1/TP of the
    # sequence (activations per layer s*h*34/t bytes instead of s*h*(10 + 24/t), Korthikanti et al. 2022) for the
    # same all-reduce volume (an all-gather + reduce-scatter pair replaces each all-reduce) and the same numbers.
    # null (default) = on when tensor_model_parallel_size > 1, as every Megatron-LM recipe runs TP; false turns it
    # off; true at TP = 1 is refused (there is nothing to split the sequence over).
    sequence_parallel: bool | None = None
    distributed_timeout_minutes: int = 30


def resolve_sequence_parallel(cfg: ParallelConfig) -> bool:
    """Whether `cfg` runs sequence parallelism (null = on at TP > 1)."""
    if cfg.sequence_parallel is None:
        return cfg.tensor_model_parallel_size > 1
    return bool(cfg.sequence_parallel) and cfg.tensor_model_parallel_size > 1


_sequence_parallel: bool | None = None  # the setting of the latest `initialize` (None: not called)


def sequence_parallel() -> bool:
    """Whether models built now use sequence parallelism: what the latest `initialize` resolved; without one
    (megatron's parallel state set up directly), the default, TP > 1."""
    if _sequence_parallel is not None:
        return _sequence_parallel
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size() > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_world_size(cfg: ParallelConfig) -> int:
    """The smallest world these sizes tile (data parallel = 1): the process count `dapo-megatron train` starts alone.

    Every size that multiplies the world counts: the dense layout TP x PP x CP and the expert layout
    ETP x EP x PP (megatron carves expert parallel out of the data-parallel x context-parallel ranks).
    """
    etp = cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size
    return math.lcm(cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.context_parallel_size,
                    etp * cfg.expert_model_parallel_size * cfg.pipeline_model_parallel_size)


def data_parallel_size(cfg: ParallelConfig, world_size: int) -> int:
    return world_size // (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
                          * cfg.context_parallel_size)


def check_sizes(cfg: ParallelConfig, world_size: int) -> None:
    """Raise a one-line actionable error when the parallel sizes cannot tile the world."""
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                "expert_model_parallel_size", "distributed_timeout_minutes"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel.{key}={value!r} must be an integer >= 1")
    vpp = cfg.virtual_pipeline_model_parallel_size
    if vpp is not None and (not isinstance(vpp, int) or vpp < 1):
        raise ValueError(f"parallel.virtual_pipeline_model_parallel_size={vpp!r} must be null or an integer >= 1")
    model_parallel = (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
                      * cfg.context_parallel_size)
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({cfg.tensor_model_parallel_size}) x pipeline_model_parallel_size ({cfg.pipeline_model_parallel_size})"
            f" x context_parallel_size ({cfg.context_parallel_size}); change the sizes or --nproc_per_node")
    ep, etp = cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size
    if etp == cfg.tensor_model_parallel_size and (world_size // model_parallel * cfg.context_parallel_size) % ep:
        raise ValueError(
            f"parallel.expert_model_parallel_size={ep} must divide data-parallel x context-parallel size "
            f"{world_size // model_parallel * cfg.context_parallel_size} (world {world_size}); lower it or start "
            f"a multiple of {planned_world_size(cfg)} processes")
    expert_parallel = etp * cfg.expert_model_parallel_size * cfg.pipeline_model_parallel_size
    if world_size % expert_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by expert_tensor_parallel_size ({etp}) x "
            f"expert_model_parallel_size ({cfg.expert_model_parallel_size}) x pipeline_model_parallel_size "
            f"({cfg.pipeline_model_parallel_size}); change the sizes or --nproc_per_node")


def check_supported(cfg: ParallelConfig, num_experts: int = 0) -> None:
    """Refuse, in one line naming the key, every size the trainer cannot run correctly (before any process starts).

    `num_experts`: the model's routed experts (0 or None for a dense model).
    """
    if cfg.context_parallel_size > 1:
        raise ValueError(
            f"parallel.context_parallel_size={cfg.context_parallel_size} is not supported: megatron-core's local "
            "attention (CPU) has no context parallelism and the trainer does not split sequences or loss counts "
            "over CP ranks (megatron DDP would scale gradients by CP); set parallel.context_parallel_size=1")
    if cfg.expert_model_parallel_size > 1 and not num_experts:
        raise ValueError(
            f"parallel.expert_model_parallel_size={cfg.expert_model_parallel_size} needs a mixture-of-experts model; "
            "model.path is dense (no experts), where EP would only act as data parallel: set it to 1")
    etp = cfg.expert_tensor_parallel_size
    if etp is not None and etp != cfg.tensor_model_parallel_size and not num_experts:
        raise ValueError(
            f"parallel.expert_tensor_parallel_size={etp} needs a mixture-of-experts model; model.path is dense: "
            "set it to null")
    if num_experts and num_experts % cfg.expert_model_parallel_size:
        raise ValueError(
            f"parallel.expert_model_parallel_size={cfg.expert_model_parallel_size} must divide the model's "
            f"num_experts={num_experts}; pick a divisor of {num_experts}")
    if cfg.virtual_pipeline_model_parallel_size is not None:
        raise ValueError(
            f"parallel.virtual_pipeline_model_parallel_size={cfg.virtual_pipeline_model_parallel_size} is not "
            "supported: the actor builds one model chunk per pipeline stage (no interleaved schedule); set it to null")
    sp = cfg.sequence_parallel
    if sp not in (None, True, False):
        raise ValueError(f"parallel.sequence_parallel={sp!r} must be true, false or null (null: on when TP > 1)")
    if sp and cfg.tensor_model_parallel_size == 1:
        raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1 (it splits "
                         "the sequence over the TP ranks); set it to null or false, or raise the TP size")
    if sp is False and num_experts and cfg.tensor_model_parallel_size > 1:
        raise ValueError(
            f"parallel.sequence_parallel=false with tensor_model_parallel_size={cfg.tensor_model_parallel_size}: "
            "megatron-core trains mixture-of-experts layers at TP > 1 only with sequence parallelism; set it to null")


def initialize(cfg: ParallelConfig | None = None, seed: int = 1234) -> None:
    """Initialise torch.distributed (nccl on GPU, gloo on CPU), megatron parallel_state and its RNG tracker.

    Works without torchrun too (a world of one process on a free local port). Unsupported sizes are refused
    earlier, by `check_supported` in config.validate.
    """
    from megatron.core import parallel_state

    cfg = cfg or ParallelConfig()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        from . import cpu_compat

        cpu_compat.enable()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo",
                                timeout=datetime.timedelta(minutes=cfg.distributed_timeout_minutes))
    check_sizes(cfg, dist.get_world_size())
    global _sequence_parallel
    # Recorded on every call (the groups are made once): a process may build models with SP on and off.
    _sequence_parallel = resolve_sequence_parallel(cfg)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size,
            expert_model_parallel_size=cfg.expert_model_parallel_size,
            expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
            distributed_timeout_minutes=cfg.distributed_timeout_minutes,
        )
    seed_all(seed)


def seed_all(seed: int) -> None:
    """Seed python/torch and megatron's model-parallel RNG tracker (TP ranks get distinct streams)."""
    import random

    from megatron.core import tensor_parallel

    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    global _sequence_parallel
    _sequence_parallel = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
