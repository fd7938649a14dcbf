"""`dapo-megatron train | eval | serve | convert | plan | engines` console entry.

Every command registered in COMMANDS runs inside one error boundary (`run_command`): a user error (config, data,
checkpoint, model, placement, memory plan, an unreachable server, a full disk, a bad command line) prints one line,
`dapo-megatron <command>: <kind> error: ...`, naming the thing and the fix, and exits 2;
`--debug` or DAPO_DEBUG=1 shows the traceback instead. Ranks that `train` launches under torchrun print their one
line the same way (a line raised on every rank once), and the launching process exits with their code, without
torchrun's report.
"""
import argparse
import os
import sys

from .errors import describe

EXIT_USER_ERROR = 2


def _train(argv):
    p = argparse.ArgumentParser(prog="dapo-megatron train", description="DAPO training (run under torchrun, or "
                                "alone: it re-launches itself on TP x PP local processes)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.clip_ratio_high=0.28")
    args = p.parse_args(argv)
    from .config import build_config, validate
    from .parallel import planned_world_size

    cfg = build_config(args.config, args.overrides)
    nproc = planned_world_size(cfg.parallel)
    # Under torchrun: this launch's world. Alone: the TP x PP (x CP, EP) processes this command is about to start.
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else nproc)
    from .preflight import check_checkpoint, check_data

    check_data(cfg)  # the prompt file read and checked here, once, before any rank starts
    check_checkpoint(cfg)  # a damaged pinned checkpoint, another architecture, an occupied save folder
    if "RANK" not in os.environ and nproc > 1:
        sys.exit(_launch_ranks(nproc, ["train", *argv]))
    from .train.loop import run

    run(cfg)


def _launch_ranks(nproc: int, argv: list) -> int:
    """Run this CLI on `nproc` local ranks through torchrun's agent, in this process; the ranks' exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["DAPO_PREFLIGHT_DONE"] = "1"  # the data file was checked here: ranks need not read it again
    import shutil
    import tempfile

    os.environ["DAPO_ERROR_DIR"] = errors = tempfile.mkdtemp(prefix="dapo-megatron-errors-")  # see _first_to_say
    print(f"launching {nproc} processes: torchrun --standalone --nproc_per_node={nproc} -m dapo_megatron.cli "
          f"{' '.join(argv)}", flush=True)
    if not _debug():
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its report repeats the rank's
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "dapo_megatron.cli", *argv])
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c > 0), 1)
    finally:
        shutil.rmtree(errors, ignore_errors=True)
    return 0


def _eval(argv):
    p = argparse.ArgumentParser(prog="dapo-megatron eval", description="avg@k accuracy of model.path on eval.path")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from .config import ConfigError, load_config
    from .train.stages import RolloutStage

    cfg = load_config(args.config, args.overrides)
    if not cfg.eval.path:
        raise ConfigError("eval.path is required for dapo-megatron eval: give a held-out JSONL/Parquet file")
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
        raise UsageError("give a direction: dapo-megatron convert {hf-to-megatron|megatron-to-hf} ... (--help)")
    from .models import convert

    sys.exit((convert.main_hf_to_megatron if argv[0] == "hf-to-megatron" else convert.main_megatron_to_hf)(argv[1:]))


def _plan(argv):
    from .placement import main

    main(argv)


def _engines(argv):
    from .rollout.node_engines import main

    sys.exit(main(argv))



COMMANDS = {"train": _train, "eval": _eval, "serve": _serve, "convert": _convert, "plan": _plan,
            "engines": _engines}
HELP = {"train": "DAPO training from a YAML config and dotted overrides",
        "eval": "avg@k accuracy of model.path on eval.path",
        "serve": "serve an HF model with the embedded engine (SGLang's HTTP API)",
        "convert": "checkpoint conversion: hf-to-megatron | megatron-to-hf",
        "plan": "where every trainer rank and engine runs, and each stage's GPU memory (--nodes N --gpus-per-node G)",
        "engines": "start the engines the plan puts on this node (one with no trainer rank); serve until SIGTERM"}


class UsageError(ValueError):
    """A bad command line (argparse's complaint, a missing sub-command)."""


def _usage_error(parser, message):
    raise UsageError(f"{message} (usage: {' '.join(parser.format_usage().split())[7:]})")


def _report(argv):
    from .report import main

    main(argv)


COMMANDS["report"] = _report
HELP["report"] = "RUN_DIR/report/index.html: plots of metrics.jsonl and a browser of the rollout dumps"


def _debug() -> bool:
    return os.environ.get("DAPO_DEBUG", "") not in ("", "0")


def user_errors() -> tuple:
    """Exception types that are the user's to fix (their message names the thing); everything else is a bug."""
    from .config import ConfigError
    from .data.dataset import DataError
    from .models.hf_config import UnsupportedModelError
    from .models.hf_io import CheckpointError
    from .placement import PlacementError
    from .rollout.client import RolloutError

    errors = [ConfigError, DataError, CheckpointError, UnsupportedModelError, RolloutError, PlacementError, UsageError,
              OSError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def run_command(name: str, argv: list) -> int:
    """The error boundary of one command: 0, the command's own exit code, or EXIT_USER_ERROR after one line."""
    import argparse

    error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _usage_error  # every command's parser (also convert's, serve's) says it in one line
    try:
        return _run_command(name, argv)
    finally:
        argparse.ArgumentParser.error = error


def _run_command(name: str, argv: list) -> int:
    if _debug():
        COMMANDS[name](argv)
        return 0
    try:
        COMMANDS[name](argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(str(e.code), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        hint = "" if isinstance(e, UsageError) else " (DAPO_DEBUG=1 for the traceback)"
        line = f"dapo-megatron {name}: {describe(e)}{hint}"
        if _first_to_say(line):
            print(line, file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def _first_to_say(line: str) -> bool:
    """False when another rank that `train` launched already printed this very line (a user error raised on every
    rank prints once; different lines all print). Ranks of an outside torchrun / srun each print theirs."""
    folder = os.environ.get("DAPO_ERROR_DIR")
    if not folder or "RANK" not in os.environ:
        return True
    import hashlib

    try:
        os.close(os.open(os.path.join(folder, hashlib.sha256(line.encode()).hexdigest()[:32]),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or unwritable: say it rather than lose it
        return True
    return True


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["DAPO_DEBUG"] = "1"  # ranks launched by `train` inherit it
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = [f"  {name:<9} {HELP.get(name, '')}" for name in COMMANDS]
        print("usage: dapo-megatron [--debug] {" + "|".join(COMMANDS) + "} ...\n\ncommands:\n" + "\n".join(lines)
              + "\n\n--debug (or DAPO_DEBUG=1): show tracebacks instead of one-line errors")
        sys.exit(0 if argv else EXIT_USER_ERROR)
    if argv[0] not in COMMANDS:
        print(f"dapo-megatron: usage error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(run_command(argv[0], argv[1:]))


if __name__ == "__main__":
    main()
