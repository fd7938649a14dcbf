"""Process groups: torch.distributed + megatron-core parallel_state in one call, and a clean teardown."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1  # MoE only: experts split across this many ranks (carved out of DP)
    expert_tensor_parallel_size: int | None = None  # MoE only: TP inside each expert; null = tensor_model_parallel_size
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    distributed_timeout_minutes: int = 30


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def min_world_size(cfg: ParallelConfig) -> int:
    """The smallest world that tiles both the dense (TP x PP x CP) and the expert (ETP x EP x PP) layouts."""
    import math

    etp = cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size
    return math.lcm(cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.context_parallel_size,
                    etp * cfg.expert_model_parallel_size * cfg.pipeline_model_parallel_size)


def check_sizes(cfg: ParallelConfig, world_size: int) -> None:
    """Raise a one-line actionable error when the parallel sizes cannot tile the world."""
    model_parallel = (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
                      * cfg.context_parallel_size)
    if model_parallel <= 0 or world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({cfg.tensor_model_parallel_size}) x pipeline_model_parallel_size ({cfg.pipeline_model_parallel_size})"
            f" x context_parallel_size ({cfg.context_parallel_size}); change the sizes or --nproc_per_node")
    etp = cfg.expert_tensor_parallel_size or cfg.tensor_model_parallel_size
    expert_parallel = etp * cfg.expert_model_parallel_size * cfg.pipeline_model_parallel_size
    if world_size % expert_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by expert_tensor_parallel_size ({etp}) x "
            f"expert_model_parallel_size ({cfg.expert_model_parallel_size}) x pipeline_model_parallel_size "
            f"({cfg.pipeline_model_parallel_size}); change the sizes or --nproc_per_node")


def initialize(cfg: ParallelConfig | None = None, seed: int = 1234) -> None:
    """Initialise torch.distributed (nccl on GPU, gloo on CPU), megatron parallel_state and its RNG tracker.

    Works without torchrun too (a world of one process on a free local port).
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

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
