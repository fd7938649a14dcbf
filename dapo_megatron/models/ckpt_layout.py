"""The checkpoint folder layout and its integrity rules, in one place (trainer, resume and converter use it).

    ROOT/latest                   name of the newest complete iteration folder (written after the folder is complete)
    ROOT/hf_config/               config.json + tokenizer files of the model
    ROOT/iter_{N:07d}/            one checkpoint:
        model/                    megatron dist_checkpointing of the model (loads at any TP/PP)
        optim/                    dist_checkpointing of the optimizer          (kind "train" only)
        rng/rank{r}.pt            RNG state of each rank                       (kind "train" only)
        trainer_state.json        step, scheduler, data/rollout state          (kind "train" only)
        manifest.json             written LAST: kind, iteration, parent, arch, padded vocabulary, every file + size
    ROOT/abandoned_<timestamp>/   checkpoints a rollback moved aside (never deleted)

Two kinds, told apart by `manifest.json["kind"]`: "train" (written by the trainer; resumes the run exactly) and
"model" (written by `dapo-megatron convert hf-to-megatron`; weights only, loads as initial weights at step 0).
A folder is complete only when its manifest parses, names every part its kind needs, and every listed file exists
with the listed size (and, for files up to 1 MiB, the listed sha256). Anything else is damaged or incomplete.
"""
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from .hf_io import CheckpointError

LATEST = "latest"
HF_CONFIG_DIR = "hf_config"
MODEL_DIR = "model"
OPTIM_DIR = "optim"
RNG_DIR = "rng"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
KIND_TRAIN, KIND_MODEL = "train", "model"
REQUIRED = {KIND_TRAIN: (MODEL_DIR, OPTIM_DIR, RNG_DIR, TRAINER_STATE), KIND_MODEL: (MODEL_DIR,)}
_HASH_LIMIT = 1 << 20
_ITER_RE = re.compile(r"iter_(\d{7})")


class CheckpointDamaged(CheckpointError):
    """A checkpoint folder that is incomplete or does not match its manifest (the message names the file)."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(path) -> Optional[int]:
    m = _ITER_RE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def is_checkpoint_dir(path) -> bool:
    """An iteration folder (complete or not), as opposed to a checkpoint root."""
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / MODEL_DIR).is_dir()


def iteration_dirs(root) -> list[Path]:
    """The iter_* folders directly under `root`, newest (highest iteration) first."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=iteration_of, reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            entry = {"size": p.stat().st_size}
            if entry["size"] <= _HASH_LIMIT:
                entry["sha256"] = _sha256(p)
            out[p.relative_to(folder).as_posix()] = entry
    return out


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(folder, kind: str, iteration: int, parent: Optional[str] = None, arch: Optional[dict] = None,
                   world_size: Optional[int] = None, vocab: Optional[dict] = None) -> dict:
    """Record every file of `folder` (call it last, once every part is on disk). `vocab`: see `vocab_record`."""
    folder = Path(folder)
    missing = [p for p in REQUIRED[kind] if not (folder / p).exists()]
    if missing:
        raise CheckpointDamaged(f"{folder}: cannot seal a {kind} checkpoint without {missing[0]}")
    manifest = {"format": 1, "kind": kind, "iteration": iteration, "parent": parent, "arch": arch,
                "world_size": world_size, **({"vocab": vocab} if vocab else {}), "files": _files(folder)}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder) -> dict:
    """The manifest of a complete checkpoint; CheckpointDamaged (one line naming the file) otherwise."""
    folder = Path(folder)
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CheckpointDamaged(f"{folder.name} is incomplete: no {MANIFEST} (the save was interrupted)")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
        kind, files = manifest["kind"], manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(f"{mf} is unreadable ({type(e).__name__})") from None
    if kind not in REQUIRED:
        raise CheckpointDamaged(f"{mf}: unknown checkpoint kind {kind!r}")
    for part in REQUIRED[kind]:
        if not any(name == part or name.startswith(part + "/") for name in files):
            raise CheckpointDamaged(f"{folder.name} is incomplete: its manifest lists no {part}")
    for name, entry in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointDamaged(f"{folder.name} is damaged: {name} is missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointDamaged(f"{folder.name} is damaged: {name} has {size} bytes, the manifest says "
                                    f"{entry['size']} (truncated or rewritten)")
        if "sha256" in entry and _sha256(p) != entry["sha256"]:
            raise CheckpointDamaged(f"{folder.name} is damaged: {name} does not match its checksum")
    return manifest


def read_latest(root) -> Optional[str]:
    """The folder name `latest` holds, or None when the file is absent, unreadable or not an iter_* name."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    try:
        name = marker.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return None
    return name if _ITER_RE.fullmatch(name) else None


def write_latest(root, name: str) -> None:
    write_text_atomic(Path(root) / LATEST, name + "\n")


def newest_complete(root, log=print) -> tuple[Path, dict]:
    """The checkpoint a resume from `root` uses: the newest iter_* folder, or the newest complete one below a damaged
    newest (said in one line naming both). `latest` only confirms: a garbled one is reported and not trusted."""
    root = Path(root)
    dirs = iteration_dirs(root)
    if not dirs:
        raise CheckpointError(f"{root} holds no iter_* checkpoint folder; point trainer.load at a checkpoint root "
                              "or an iter_* folder")
    if (root / LATEST).exists() and read_latest(root) is None:
        log(f"warning: {root / LATEST} is unreadable; choosing the checkpoint by its iter_* folders")
    reasons = []
    for path in dirs:
        try:
            manifest = read_manifest(path)
        except CheckpointDamaged as e:
            reasons.append(str(e))
            continue
        if reasons:
            log(f"warning: newest checkpoint {dirs[0].name} is unusable ({reasons[0]}); "
                f"resuming from {path.name}, the newest complete one")
        return path, manifest
    raise CheckpointError(f"{root} has no complete checkpoint: {reasons[0]}; remove trainer.load to start fresh")


def resolve(load, log=print) -> tuple[Path, dict]:
    """(folder, manifest) for `trainer.load`: a root (its newest complete checkpoint) or a pinned iter_* folder
    (refused when damaged)."""
    load = Path(load)
    if not load.exists():
        raise CheckpointError(f"trainer.load={load} holds no checkpoint (no such folder)")
    if is_checkpoint_dir(load):
        try:
            return load, read_manifest(load)
        except CheckpointDamaged as e:
            raise CheckpointDamaged(f"trainer.load={load}: {e}; pin another iter_* folder or load its root "
                                    "to use the newest complete one") from None
    return newest_complete(load, log)


def lineage(root, start: str) -> list[Path]:
    """`start` and its ancestors under `root` (the checkpoints this run descends from), newest first."""
    root, chain, name = Path(root), [], start
    while name and (root / name).is_dir() and root / name not in chain:
        chain.append(root / name)
        try:
            name = json.loads((root / name / MANIFEST).read_text()).get("parent")
        except (OSError, ValueError):
            break
    return chain


def _kind(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError):
        return None


def prune(root, keep_last: int, log=print) -> list[Path]:
    """Delete all but the `keep_last` newest checkpoints of the lineage `latest` names; nothing off that lineage."""
    name = read_latest(root)
    if keep_last <= 0 or name is None:
        return []
    old = [p for p in lineage(root, name)[keep_last:] if _kind(p) == KIND_TRAIN]  # never the converter's weights
    for path in old:
        shutil.rmtree(path)
    return old


def move_aside(root, newer_than: int, reason: str, log=print) -> Optional[Path]:
    """Move every iter_* folder above `newer_than` into ROOT/abandoned_<timestamp>/ (a rollback keeps them)."""
    root = Path(root)
    if not root.is_dir():
        return None
    victims = [p for p in iteration_dirs(root) if iteration_of(p) > newer_than]
    if not victims:
        return None
    dest = root / time.strftime("abandoned_%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(dest.name.split(".")[0] + f".{n}")
    dest.mkdir()
    for p in victims:
        os.rename(p, dest / p.name)
    if read_latest(root) in {p.name for p in victims}:
        write_latest(root, iter_name(newer_than)) if (root / iter_name(newer_than)).is_dir() else \
            (root / LATEST).unlink()
    log(f"moved {', '.join(sorted(p.name for p in victims))} aside into {dest} ({reason})")
    return dest


def arch_summary(hf_config_dir) -> dict:
    """The architecture fields a checkpoint must share with `model.path` (from its HF config.json)."""
    import dataclasses

    from .hf_config import arch_from_hf, load_hf_config

    arch = dataclasses.asdict(arch_from_hf(load_hf_config(hf_config_dir)))
    keys = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "kv_channels", "vocab_size", "qkv_bias", "qk_layernorm", "tie_word_embeddings")
    return {k: arch[k] for k in keys}


def check_compatible(manifest: dict, folder, model_path) -> None:
    """Refuse a checkpoint whose architecture differs from `model.path` (one line naming the field)."""
    saved = manifest.get("arch")
    if not saved:
        hf = Path(folder).parent / HF_CONFIG_DIR
        if not (hf / "config.json").is_file():
            return
        saved = arch_summary(hf)
    want = arch_summary(model_path)
    for k, v in want.items():
        if k in saved and saved[k] != v:
            raise CheckpointError(f"checkpoint {folder} has {k}={saved[k]} but model.path={model_path} has {k}={v}; "
                                  "set model.path to the model the checkpoint was trained from")


def claim_for_resume(save_root, loaded: Path, manifest: dict, log=print) -> None:
    """Make `save_root` continue the lineage of `loaded`: newer folders there move aside, `latest` names `loaded`."""
    save_root = Path(save_root)
    if Path(loaded).parent.resolve() != save_root.resolve():
        return  # loaded from elsewhere (the converter's output, another run): that folder stays untouched
    move_aside(save_root, manifest["iteration"], f"resuming from {Path(loaded).name}, so they are no longer this "
               "run's lineage", log)
    if manifest["kind"] == KIND_TRAIN and read_latest(save_root) != Path(loaded).name:
        write_latest(save_root, Path(loaded).name)


def vocab_record(padded: int, tp: int, divisor: Optional[int] = None) -> dict:
    """The manifest's "vocab": the embedding / output layer rows saved, and the TP (and divisor) that padded them."""
    return {"padded_vocab_size": int(padded), "tensor_model_parallel_size": int(tp),
            "make_vocab_size_divisible_by": divisor}


def _divisor_for(padded: int, vocab_size: int, tp: int, near: int) -> Optional[int]:
    """A make_vocab_size_divisible_by that pads `vocab_size` to `padded` at `tp`: the largest <= `near`, else the
    smallest; None when there is none."""
    from .hf_config import padded_vocab_size

    if padded % tp or padded < vocab_size:
        return None
    fits = [d for d in range(1, padded // tp + 1)
            if (padded // tp) % d == 0 and padded_vocab_size(vocab_size, d, tp) == padded]
    below = [d for d in fits if d <= near]
    return max(below) if below else (min(fits) if fits else None)


def vocab_mismatch(saved: Optional[dict], vocab_size: int, divisor: int, tp: int) -> Optional[str]:
    """Why a checkpoint whose manifest records `saved` (its "vocab") cannot load into a model padded at `tp` with
    `divisor`, or None when it can (or when an old manifest records nothing). The fix, without the folder's name."""
    from .hf_config import padded_vocab_size

    if not saved or not saved.get("padded_vocab_size"):
        return None
    have, want = saved["padded_vocab_size"], padded_vocab_size(vocab_size, divisor, tp)
    if have == want:
        return None
    saved_tp, saved_div = saved.get("tensor_model_parallel_size"), saved.get("make_vocab_size_divisible_by")
    fixes = []
    if saved_tp and saved_tp != tp and padded_vocab_size(vocab_size, divisor, saved_tp) == have:
        fixes.append(f"resume at parallel.tensor_model_parallel_size={saved_tp}")
    d = saved_div if saved_div and padded_vocab_size(vocab_size, saved_div, tp) == have else \
        _divisor_for(have, vocab_size, tp, divisor)
    if d is not None:
        fixes.append(f"set model.make_vocab_size_divisible_by={d} so the padded sizes agree")
    fixes.append(f"convert it through HF (convert megatron-to-hf, then hf-to-megatron --tensor-model-parallel-size "
                 f"{tp}: weights only)")
    how = ", ".join(x for x in (f"TP={saved_tp}" if saved_tp else "",
                                f"make_vocab_size_divisible_by={saved_div}" if saved_div else "") if x)
    return (f"has its vocabulary padded to {have} rows{f' ({how})' if how else ''} but this run pads "
            f"vocab_size={vocab_size} to {want} (parallel.tensor_model_parallel_size={tp}, "
            f"model.make_vocab_size_divisible_by={divisor}); {', or '.join(fixes)}")


def check_vocab(manifest: dict, folder, vocab_size: int, divisor: int, tp: int) -> None:
    """Refuse, in one line, a checkpoint whose padded vocabulary differs from this run's (megatron's load would
    fail with a shape mismatch on every rank)."""
    why = vocab_mismatch(manifest.get("vocab"), vocab_size, divisor, tp)
    if why:
        raise CheckpointError(f"checkpoint {folder} {why}")
