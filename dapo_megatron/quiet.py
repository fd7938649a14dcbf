"""Library notices that say nothing to a user of dapo_megatron, dropped by exact message (nothing else is touched).

`install()` runs when the package is imported (dapo_megatron/__init__.py), before any megatron-core import: most of
these are emitted at megatron's import time. Each entry says why the notice is not for our users. A megatron
warning that is not listed here still reaches stderr, as it should.

Logging: megatron-core's loggers have no handler, so Python's last-resort handler prints WARNING records to stderr
(a one-line refusal became two). A filter on the exact logger drops only the listed messages.
"""
import logging
import warnings

# (logger, message prefix, why it is not for our users)
LOG_NOTICES = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED",
     "megatron-core >= 0.19 on every GPTModel(); our assessment and plan: docs/hybrid_model.md"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated",
     "megatron-core 0.19's synchronous torch_dist save runs through its own async request (async_strategy='mcore') "
     "and logs this although nothing is saved asynchronously; see train/checkpoint.py"),
    ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel: full_param_layout not provided",
     "megatron-core 0.19 with the distributed optimizer: DDP computes the layout itself, as 0.16.1 always does (its "
     "DDP takes no layout argument)"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found",
     "the CUDA build of torch (PyPI torch 2.14.1) imported on a machine without a GPU; nothing is compiled"),
)

# (message regex, category, module regex, why)
WARNING_NOTICES = (
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.",
     "CPU runs use megatron's torch fallbacks by design; GPU installs have Transformer Engine"),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, r"megatron\.",
     "we never use Apex; the torch norm is the intended one"),
    (r"full scope is deprecated", UserWarning, r"megatron\.",
     "TransformerConfig's own default cuda_graph scope; we set no CUDA-graph option"),
    (r"MimoModelConfig is experimental", UserWarning, r"megatron\.",
     "megatron-core 0.19 import side effect of a model we do not use"),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed\.", "torch >= 2.13 on the collectives megatron-core's DDP and distributed optimizer call"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     r"(megatron|torch|dapo_megatron)\.", "torch >= 2.13 on megatron-core's dist_checkpointing internals (on CPU "
     "the call passes through our device shim, parallel/cpu_compat.py, and is attributed to it)"),
)


class _DropNotices(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_INSTALLED = False


def install() -> None:
    """Drop the notices listed above (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    by_logger = {}
    for name, prefix, _ in LOG_NOTICES:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropNotices(prefixes))
    filter_warnings()
    _INSTALLED = True


def filter_warnings() -> None:
    """The warnings filters of WARNING_NOTICES, in front of the current ones."""
    for message, category, module, _ in WARNING_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
