"""`dapo-megatron train | eval | serve | convert` console entry."""
import argparse
import os
import subprocess
import sys


def _train(argv):
    p = argparse.ArgumentParser(prog="dapo-megatron train", description="DAPO training (run under torchrun, or "
                                "alone: it re-launches itself on TP x PP local processes)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.clip_ratio_high=0.28")
    args = p.parse_args(argv)
    from . import parallel
    from .config import ConfigError, build_config, validate

    try:
        cfg = build_config(args.config, args.overrides)
        nproc = parallel.min_world_size(cfg.parallel)
        # Under torchrun: this launch's world. Alone: the TP x PP processes this command is about to start.
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else nproc)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if "RANK" not in os.environ and nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "dapo_megatron.cli", "train", *argv]
        print(f"launching {nproc} processes: {' '.join(cmd)}", flush=True)
        sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}))
    from .train.loop import run

    run(cfg)


def _eval(argv):
    p = argparse.ArgumentParser(prog="dapo-megatron eval", description="avg@k accuracy of model.path on eval.path")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from .config import load_config
    from .train.stages import RolloutStage

    cfg = load_config(args.config, args.overrides)
    if not cfg.eval.path:
        sys.exit("config error: eval.path is required for dapo-megatron eval")
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    stage = RolloutStage(cfg, tok)
    try:
        print(stage.evaluate(tok))
    finally:
        stage.close()


def _serve(argv):
    from .rollout.server import main

    main(argv)


def _convert(argv):
    if not argv or argv[0] not in ("hf-to-megatron", "megatron-to-hf"):
        sys.exit("usage: dapo-megatron convert {hf-to-megatron|megatron-to-hf} ...")
    from .models import convert

    sys.exit((convert.main_hf_to_megatron if argv[0] == "hf-to-megatron" else convert.main_megatron_to_hf)(argv[1:]))


COMMANDS = {"train": _train, "eval": _eval, "serve": _serve, "convert": _convert}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: dapo-megatron {{{'|'.join(COMMANDS)}}} ...")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
