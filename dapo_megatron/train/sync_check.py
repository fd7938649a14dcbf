"""The equality check of a weight sync: is every engine's copy the trainer's, bit for bit? Run after every
`rollout.check_weight_sync`-th sync (0: off; refused by backends whose engines serve no weights digest), and after
every sync with the test hook DAPO_CHECK_SYNC=1, which also measures how much memory each rank took for the sync.
A mismatch under rollout.check_weight_sync stops the run before any rollout on those weights (`WeightSyncMismatch`,
one line naming the first differing tensor and the engine, raised on every rank).

`probe()` measures a rank's peak resident memory over the sync: it resets the kernel's high-water mark
(/proc/self/clear_refs, "5") before and reads VmHWM after, over the VmRSS just before (no sampling, nothing missed).
`check()` then streams the trainer's HF weights a second time, the same way (train/weight_stream.py), and each engine
host compares every tensor with its engine's parameter (`torch.equal`); with disk sync, rank 0 compares each
tensor's sha256 with every engine's over HTTP (/debug/weights_digest, served by the embedded server with the hook
on). Rank 0 gets, as metrics: `debug/sync_tensors_checked` and `debug/sync_mismatches` (summed over engine hosts),
and per rank r `debug/sync_rss_growth_mb/rank{r}`, `debug/stage_mb/rank{r}` (its parameters) and
`debug/sync_largest_tensor_mb`.
The check streams the weights a second time: its cost is one more sync's stream and a hash per tensor, every N syncs.
"""
import contextlib
import os

import torch
import torch.distributed as dist

from ..rollout.client import RolloutError

ENV = "DAPO_CHECK_SYNC"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def due(every: int, syncs: int) -> bool:
    """Check this sync (the `syncs`-th of the run)? rollout.check_weight_sync=every, or the test hook."""
    return enabled() or (every > 0 and syncs % every == 0)


class WeightSyncMismatch(RolloutError):
    """An engine's weights differ from the trainer's after a sync (rollout.check_weight_sync)."""


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


class _RSS:
    growth_mb = None


@contextlib.contextmanager
def probe():
    out = _RSS()
    if not enabled():
        yield out
        return
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    yield out
    out.growth_mb = (_status_kb("VmHWM") - before) / 1024


def check(actor, dsts: list, sink, bucket_mb: float, rss: _RSS, *, every: int = 0, syncs: int = 0,
          version: int = 0) -> dict:
    """Collective (every rank, after the sync): metrics on rank 0, {} elsewhere and when not `due`. Raises
    WeightSyncMismatch on every rank when a check that rollout.check_weight_sync asked for finds a difference."""
    if not due(every, syncs):
        return {}
    from ..rollout.hf_update import _hf_targets
    from .weight_stream import WeightStream

    # the engine in this process: the tensor sync's, or the in-process client's of a disk sync
    engine = getattr(sink, "engine", None) or getattr(getattr(sink, "client", None), "engine", None)
    counts, covered = {"checked": 0, "mismatches": 0, "largest_mb": 0.0, "first": None}, set()

    def compare(buckets):
        params = _hf_targets(engine.model)
        for bucket in buckets:
            for name, t in bucket:
                counts["checked"] += 1
                p = params.get(name)
                if p is None or p.dtype != t.dtype or not torch.equal(p.detach().cpu(), t.cpu()):
                    counts["mismatches"] += 1
                    counts["first"] = counts["first"] or f"{name} (the engine of global rank {dist.get_rank()})"
                else:
                    covered.add(p.untyped_storage().data_ptr())
                counts["largest_mb"] = max(counts["largest_mb"], t.numel() * t.element_size() / 2 ** 20)

    client = getattr(sink, "client", None) if engine is None else None  # disk sync: engines over HTTP
    sent = {}

    def digest(buckets):
        from ..rollout.weights_digest import tensor_digest

        for bucket in buckets:
            for name, t in bucket:
                sent[name] = tensor_digest(t)
                counts["largest_mb"] = max(counts["largest_mb"], t.numel() * t.element_size() / 2 ** 20)

    WeightStream(actor, dst=dsts, bucket_mb=bucket_mb).run(
        compare if engine is not None else digest if client is not None else lambda buckets: [None for _ in buckets])
    if engine is not None:  # an engine parameter the trainer never sent is a mismatch too
        unsent = sum(p.untyped_storage().data_ptr() not in covered for p in engine.model.parameters())
        counts["mismatches"] += unsent
        if unsent and counts["first"] is None:
            counts["first"] = (f"<an engine parameter the trainer never sent> (the engine of global rank "
                               f"{dist.get_rank()})")
    if client is not None:
        _compare_remote(client, sent, counts)
    stage_mb = sum(p.numel() * p.element_size() for p in actor.model.parameters()) / 2 ** 20
    mine = {"rss": rss.growth_mb, "stage_mb": stage_mb, **counts}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    first = next((e["first"] for e in everyone if e["first"]), None)
    if first is not None and every > 0:
        raise WeightSyncMismatch(
            f"weight sync to version {version}: the engine's {first} differs from the trainer's "
            f"(rollout.check_weight_sync={every}); no step trains on its rollouts. A sync that lands wrong: resume "
            f"from the last checkpoint, and report it with DAPO_DEBUG=1 if it repeats")
    if dist.get_rank() != 0:
        return {}
    out = {"debug/sync_tensors_checked": float(sum(e["checked"] for e in everyone)),
           "debug/sync_mismatches": float(sum(e["mismatches"] for e in everyone)),
           "debug/sync_largest_tensor_mb": max(e["largest_mb"] for e in everyone)}
    for r, e in enumerate(everyone):
        out[f"debug/sync_rss_growth_mb/rank{r}"] = e["rss"]
        out[f"debug/stage_mb/rank{r}"] = e["stage_mb"]
    return out


def _compare_remote(client, sent: dict, counts: dict) -> None:
    """Every engine the disk sync updated, through the client (each worker's weights digest, served with the check
    on)."""
    from ..rollout.client import run_sync
    from ..rollout.weights_digest import differing

    for i, (url, served) in enumerate(zip(client.worker_urls, run_sync(client.weights_digest()))):
        bad = differing(sent, served)
        counts["checked"] += len(sent)
        counts["mismatches"] += len(bad)
        if bad and counts["first"] is None:
            counts["first"] = f"{bad[0]} (engine {i} at {url})"
