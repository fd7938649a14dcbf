"""Moving the actor's HF-named weights and the step's batch between trainer ranks as tensors, never as pickles.

Weights: every pipeline stage's source rank (data-parallel rank 0, tensor-parallel rank 0) holds its own stage's full
HF tensors (gathered over TP one tensor at a time) and sends them in buckets of about `bucket_bytes` to one
destination rank (the rank hosting the engine, or writing the disk copy), which consumes them one bucket at a
time. No rank ever holds more than its own stage's parameters plus one bucket, and nothing touches a filesystem.
With per-node engines there are several destinations (each node's engine host); every source sends each bucket to
each of them, and every destination takes the stages in pipeline order.

Wire format of one bucket (point-to-point on the default group): an int64 header `[meta_bytes, payload_bytes]`,
the metadata as UTF-8 JSON in a uint8 tensor (names, dtypes, shapes), then the payload as one flat uint8 tensor;
a header of `[-1, 0]` ends a stage's stream.
"""
import base64
import json
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from ..rollout.weight_sync import iter_buckets

DEFAULT_BUCKET_MB = 512  # as slime does


def comm_device() -> torch.device:
    """Tensors on the default group live where its backend wants them (NCCL: the current GPU; gloo: CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def stage_source_ranks() -> list[int]:
    """Global rank of the sender of each pipeline stage (DP rank 0, TP rank 0), indexed by PP rank. Collective."""
    from megatron.core import parallel_state as ps

    mine = -1
    if ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
        mine = ps.get_pipeline_model_parallel_rank()
    table = [torch.zeros(1, dtype=torch.int64, device=comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(table, torch.tensor([mine], dtype=torch.int64, device=comm_device()))
    by_stage = {int(t): r for r, t in enumerate(table) if int(t) >= 0}
    return [by_stage[p] for p in range(len(by_stage))]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def send_bucket(bucket: list, dst: int) -> int:
    dev = comm_device()
    tensors = [t.detach().contiguous() for _, t in bucket]
    meta = json.dumps({"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for t in tensors],
                       "shapes": [list(t.shape) for t in tensors]}).encode()
    payload = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]).to(dev)
    dist.send(torch.tensor([len(meta), payload.numel()], dtype=torch.int64, device=dev), dst)
    dist.send(torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(dev), dst)
    dist.send(payload, dst)
    return payload.numel()


def send_end(dst: int) -> None:
    dist.send(torch.tensor([-1, 0], dtype=torch.int64, device=comm_device()), dst)


def recv_buckets(src: int) -> Iterator[list]:
    """Buckets from `src` until its end marker; each is a list of (name, tensor) views into one received buffer."""
    dev = comm_device()
    while True:
        bucket = payload = None  # drop the previous bucket before the next one arrives  # noqa: F841
        header = torch.empty(2, dtype=torch.int64, device=dev)
        dist.recv(header, src)
        meta_len, nbytes = int(header[0]), int(header[1])
        if meta_len < 0:
            return
        raw = torch.empty(meta_len, dtype=torch.uint8, device=dev)
        dist.recv(raw, src)
        meta = json.loads(bytes(raw.cpu().tolist()))
        payload = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dist.recv(payload, src)
        bucket, offset = [], 0
        for name, dtype, shape in zip(meta["names"], meta["dtypes"], meta["shapes"]):
            dt = _dtype(dtype)
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
            bucket.append((name, payload[offset:offset + n].view(dt).reshape(shape)))
            offset += n
        yield bucket


class WeightStream:
    """One sync's worth of the model's HF tensors, streamed to `dst`. Collective: every rank calls `run()`.

    On `dst`, `run(consume)` calls `consume(buckets)` with an iterator over the whole model's buckets (its own stage
    first, then the others in pipeline order); elsewhere `run()` sends this rank's stage (or only takes part in the
    TP gathers). Returns the bytes this rank sent or received.
    """

    def __init__(self, actor, dst=0, bucket_mb: float = DEFAULT_BUCKET_MB):
        from megatron.core import parallel_state as ps

        # dst: one rank, or a list (each node's engine host): a source sends every bucket to each of them in turn
        self.dsts = [dst] if isinstance(dst, int) else sorted(set(dst))
        self.actor, self.dst, self.bucket_bytes = actor, self.dsts[0], int(bucket_mb * 2 ** 20)
        self.sources = stage_source_ranks()
        # DP rank 0 of each stage gathers over TP; with expert parallel every rank takes part in the expert gathers
        self.is_member = ps.get_data_parallel_rank() == 0 or ps.get_expert_model_parallel_world_size() > 1
        # the sender: DP rank 0, TP rank 0 (= stage_source_ranks); other EP ranks only join the gathers
        self.is_source = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
        self.nbytes = 0

    def local_buckets(self) -> Iterator[list]:
        for bucket in iter_buckets(self.actor.hf_weights(), self.bucket_bytes):
            self.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            yield bucket
            del bucket  # held by neither side while the next one is built

    def _send_local(self, also_here: bool) -> Iterator[list]:
        """This source's buckets to every other destination (each bucket yielded here too if this rank is one)."""
        rank = dist.get_rank()
        for bucket in self.local_buckets():
            for d in self.dsts:
                if d != rank:
                    send_bucket(bucket, d)
            if also_here:
                yield bucket
            del bucket
        for d in self.dsts:
            if d != rank:
                send_end(d)

    def _all_buckets(self) -> Iterator[list]:
        rank = dist.get_rank()
        for src in self.sources:  # every destination takes the stages in the same order: no send/recv cycle
            if src == rank:
                yield from self._send_local(also_here=True)
            else:
                for bucket in recv_buckets(src):
                    self.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                    yield bucket

    def run(self, consume=None) -> int:
        rank = dist.get_rank()
        if rank in self.dsts:
            if len(self.dsts) > 1 and self.is_member and not self.is_source:
                raise RuntimeError("weight sync to several engine hosts needs each host to be a stage's source or "
                                   "no stage member (expert_model_parallel_size > 1 with per-node engines is not "
                                   "built); use one node's engine or rollout.weight_sync=disk")
            if consume is None:
                raise ValueError("WeightStream.run on the destination rank needs a consumer")
            done = [False]

            def guarded():
                yield from self._all_buckets()
                done[0] = True

            consume(guarded())
            if not done[0]:
                raise RuntimeError("the weight-sync consumer stopped before the end of the stream")
        elif self.is_source:
            for _ in self._send_local(also_here=False):
                pass
        elif self.is_member:
            for bucket in self.local_buckets():  # TP (and expert) peers take part in the source's gathers
                del bucket
        return self.nbytes


def flatten(buckets: Iterable[list]) -> Iterator[tuple]:
    for bucket in buckets:
        yield from bucket


# --------------------------------------------------------------------------- batches and log-probs as tensors
_FINISH = ("stop", "length", "abort")


def broadcast_samples(samples, src: int = 0):
    """The step's samples from `src` to every rank as two flat tensors (int64 ids, float64 values).

    Other ranks get `Sample`s carrying what the actor reads: prompt/response ids, rollout log-probs, loss mask,
    reward, score, advantage, group/index, weight version and finish reason (not texts or labels), and the engine's
    routed experts (R3) as a third, int32 tensor. `None` (no rollout stage) stays `None`; `[]` stays `[]`."""
    from ..types import Sample

    dev = comm_device()
    rank = dist.get_rank()
    sizes = torch.zeros(4, dtype=torch.int64, device=dev)  # [present, ints, floats, routed-expert ints]
    if rank == src:
        ints, floats = _encode(samples) if samples is not None else ([], [])
        experts, n_experts = _routed_experts(samples or [])
        sizes = torch.tensor([samples is not None, len(ints), len(floats), experts.numel()], dtype=torch.int64,
                             device=dev)
    dist.broadcast(sizes, src)
    if not int(sizes[0]):
        return None
    i_t = torch.tensor(ints, dtype=torch.int64, device=dev) if rank == src else \
        torch.empty(int(sizes[1]), dtype=torch.int64, device=dev)
    f_t = torch.tensor(floats, dtype=torch.float64, device=dev) if rank == src else \
        torch.empty(int(sizes[2]), dtype=torch.float64, device=dev)
    dist.broadcast(i_t, src)
    dist.broadcast(f_t, src)
    if int(sizes[3]):
        e_t = experts.to(dev) if rank == src else torch.empty(int(sizes[3]), dtype=torch.int32, device=dev)
        dist.broadcast(e_t, src)
        n_t = torch.tensor(n_experts, dtype=torch.int64, device=dev) if rank == src else \
            torch.empty(int(i_t[0]), dtype=torch.int64, device=dev)
        dist.broadcast(n_t, src)
    if rank == src:
        return samples
    out = _decode(i_t.cpu().tolist(), f_t.cpu().tolist(), Sample)
    if int(sizes[3]):
        o, flat = 0, e_t.cpu()
        for s, n in zip(out, n_t.cpu().tolist()):
            if n >= 0:
                s.routed_experts = base64.b64encode(flat[o:o + n].numpy().tobytes()).decode("ascii")
                o += n
    return out


def _routed_experts(samples) -> tuple:
    """The samples' routed experts (SGLang's base64 int32) as one flat int32 tensor and per-sample counts
    (-1: none)."""
    parts, counts = [], []
    for s in samples:
        b64 = getattr(s, "routed_experts", None)
        if b64:
            t = torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.int32)
            parts.append(t)
            counts.append(t.numel())
        else:
            counts.append(-1)
    return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)), counts


def _encode(samples) -> tuple[list, list]:
    ints, floats = [len(samples)], []
    for s in samples:
        mask = s.loss_mask
        ints += [len(s.prompt_ids), len(s.response_ids), len(s.rollout_logprobs), -1 if mask is None else len(mask),
                 s.group_id, s.index, s.weight_version, _FINISH.index(s.finish_reason) if s.finish_reason in _FINISH
                 else 0, -1 if s.correct is None else int(bool(s.correct))]
        ints += list(s.prompt_ids) + list(s.response_ids) + (list(mask) if mask is not None else [])
        floats += [s.reward, s.score, s.metadata.get("advantage", 0.0)] + list(s.rollout_logprobs)
    return ints, floats


def _decode(ints: list, floats: list, Sample) -> list:
    out, i, f = [], 1, 0
    for _ in range(ints[0]):
        n_p, n_r, n_lp, n_m, gid, idx, ver, fin, cor = ints[i:i + 9]
        i += 9
        prompt, response = ints[i:i + n_p], ints[i + n_p:i + n_p + n_r]
        i += n_p + n_r
        mask = None
        if n_m >= 0:
            mask, i = ints[i:i + n_m], i + n_m
        reward, score, adv = floats[f:f + 3]
        lps = floats[f + 3:f + 3 + n_lp]
        f += 3 + n_lp
        out.append(Sample(prompt_ids=prompt, response_ids=response, rollout_logprobs=lps, loss_mask=mask,
                          group_id=gid, index=idx, weight_version=ver, finish_reason=_FINISH[fin], reward=reward,
                          score=score, correct=None if cor < 0 else bool(cor), metadata={"advantage": adv}))
    return out


def share_response_values(values: "torch.Tensor | None", lengths_by_dp: list[list[int]], sender_dp: "int | None"):
    """Every rank gets each DP rank's per-sample values (e.g. old log-probs) from that DP rank's sender.

    `values`: on a sender, the flat concatenation of its samples' values; `lengths_by_dp[d]`: the response lengths of
    DP rank d's samples (known on every rank); `sender_dp`: this rank's DP rank if it sends, else None.
    Returns `lists[d][j]` = the values of DP rank d's j-th sample, as Python floats."""
    dev = comm_device()
    table = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(table, torch.tensor([-1 if sender_dp is None else sender_dp], dtype=torch.int64, device=dev))
    src_of = {int(t): r for r, t in enumerate(table) if int(t) >= 0}
    dtype = torch.float32 if values is None else values.dtype
    dtype_code = torch.tensor([0 if dtype == torch.float32 else 1], dtype=torch.int64, device=dev)
    dist.broadcast(dtype_code, min(src_of.values()))
    dtype = torch.float32 if int(dtype_code) == 0 else torch.float64
    out = []
    for d, lengths in enumerate(lengths_by_dp):
        buf = values.to(dev, dtype) if sender_dp == d else torch.empty(sum(lengths), dtype=dtype, device=dev)
        dist.broadcast(buf, src_of[d])
        flat = buf.cpu().tolist()
        parts, o = [], 0
        for n in lengths:
            parts.append(flat[o:o + n])
            o += n
        out.append(parts)
    return out
