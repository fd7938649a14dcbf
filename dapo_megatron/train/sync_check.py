"""Test hook (DAPO_CHECK_SYNC=1): after every tensor weight sync, is every engine's copy the trainer's, bit for bit,
and how much memory did each rank take for the sync?

`probe()` measures a rank's peak resident memory over the sync: it resets the kernel's high-water mark
(/proc/self/clear_refs, "5") before and reads VmHWM after, over the VmRSS just before (no sampling, nothing missed).
`check()` then streams the trainer's HF weights a second time, the same way (train/weight_stream.py), and each engine
host compares every tensor with its engine's parameter (`torch.equal`); with disk sync, rank 0 compares each
tensor's sha256 with every engine's over HTTP (/debug/weights_digest, served by the embedded server with the hook
on). Rank 0 gets, as metrics: `debug/sync_tensors_checked` and `debug/sync_mismatches` (summed over engine hosts),
and per rank r `debug/sync_rss_growth_mb/rank{r}`, `debug/stage_mb/rank{r}` (its parameters) and
`debug/sync_largest_tensor_mb`.
Off by default: a second stream per step is for tests, not for runs.
"""
import contextlib
import os

import torch
import torch.distributed as dist

ENV = "DAPO_CHECK_SYNC"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


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


def check(actor, dsts: list, sink, bucket_mb: float, rss: _RSS) -> dict:
    """Collective (every rank, after the sync): metrics on rank 0, {} elsewhere and when the hook is off."""
    if not enabled():
        return {}
    from ..rollout.engine import _hf_targets
    from .weight_stream import WeightStream

    engine = getattr(sink, "engine", None)
    counts, covered = {"checked": 0, "mismatches": 0, "largest_mb": 0.0}, set()

    def compare(buckets):
        params = _hf_targets(engine.model)
        for bucket in buckets:
            for name, t in bucket:
                counts["checked"] += 1
                p = params.get(name)
                if p is None or p.dtype != t.dtype or not torch.equal(p.detach().cpu(), t.cpu()):
                    counts["mismatches"] += 1
                else:
                    covered.add(p.untyped_storage().data_ptr())
                counts["largest_mb"] = max(counts["largest_mb"], t.numel() * t.element_size() / 2 ** 20)

    client = getattr(sink, "client", None) if engine is None else None  # disk sync: engines over HTTP
    if client is not None and getattr(client, "engine", None) is not None:
        client = None  # an in-process engine has no HTTP digest to compare with
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
        counts["mismatches"] += sum(p.untyped_storage().data_ptr() not in covered
                                    for p in engine.model.parameters())
    if client is not None:
        _compare_remote(client, sent, counts)
    stage_mb = sum(p.numel() * p.element_size() for p in actor.model.parameters()) / 2 ** 20
    mine = {"rss": rss.growth_mb, "stage_mb": stage_mb, **counts}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
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
    from ..rollout.weights_digest import compare_digests

    for served in run_sync(client.weights_digest()):
        counts["checked"] += len(sent)
        counts["mismatches"] += compare_digests(sent, served)
