"""Checks that read files before any process group starts: the prompt data and the checkpoint to resume.

Called by `dapo-megatron train` after `config.validate`. The data file is read on one process only (the CLI before it launches
ranks, or rank 0 under an outside torchrun); checkpoint checks are read-only and quiet (resume reports fallbacks).
"""
import os
from pathlib import Path


def check_data(cfg) -> None:
    from .data.dataset import check_file

    if os.environ.get("DAPO_PREFLIGHT_DONE") == "1" or os.environ.get("RANK", "0") != "0":
        return
    check_file(cfg.data.path)


def save_root(cfg) -> Path:
    return Path(cfg.trainer.save or Path(cfg.trainer.run_dir) / "checkpoints")


def check_checkpoint(cfg) -> None:
    from .config import ConfigError
    from .models import ckpt_layout as layout

    try:
        _check_checkpoint(cfg, layout)
    except layout.CheckpointError as e:
        raise ConfigError(str(e)) from None


def _check_checkpoint(cfg, layout) -> None:
    root = save_root(cfg)
    taken = layout.iteration_dirs(root)
    if not cfg.trainer.load:
        if taken:
            raise layout.CheckpointError(
                f"{root} already holds checkpoints (newest {taken[0].name}) and trainer.load is unset, so this run "
                f"would overwrite them; resume with trainer.load={root}, or choose another "
                "trainer.run_dir/trainer.save")
        return
    path, manifest = layout.resolve(cfg.trainer.load, log=lambda *_: None)
    layout.check_compatible(manifest, path, cfg.model.path)
    _check_vocab(cfg, layout, manifest, path)
    if taken and path.parent.resolve() != root.resolve():
        raise layout.CheckpointError(
            f"trainer.load={cfg.trainer.load} is outside the save folder {root}, which already holds another run's "
            f"checkpoints (newest {taken[0].name}); choose another trainer.run_dir/trainer.save")


def _check_vocab(cfg, layout, manifest, path) -> None:
    """The padded vocabulary depends on TP: a checkpoint saved with another padded size cannot load here."""
    from .models.hf_config import arch_from_hf, load_hf_config

    vocab_size = arch_from_hf(load_hf_config(cfg.model.path)).vocab_size
    layout.check_vocab(manifest, path, vocab_size, cfg.model.make_vocab_size_divisible_by,
                       cfg.parallel.tensor_model_parallel_size)
