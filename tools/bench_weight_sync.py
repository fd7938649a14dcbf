"""Weight sync at PP=2: seconds per GB and peak RSS per rank, the old tempfile hand-off vs per-stage bucket streaming.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tools/bench_weight_sync.py --mode stream
    python -m torch.distributed.run --standalone --nproc_per_node 2 tools/bench_weight_sync.py --mode tempfile

Each run: a random-init Qwen2.5-shaped model (`--hidden`, `--layers`, `--vocab`), PP=2, the embedded engine on rank 0;
`--syncs` syncs; rank 0 prints seconds/GB and every rank's peak resident-memory growth during a sync (sampled every 2 ms,
over the RSS just before it). `tempfile` re-creates the removed hand-off (each stage writes safetensors to a folder of rank 0's machine,
rank 0 reads all of them and holds the whole model) for the "before" numbers. The engine's weights are checked equal
to the trainer's, bit for bit, after every sync.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """Samples this process's resident memory every 2 ms in a thread; `peak` is the highest value seen."""

    def __init__(self):
        import threading

        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_mb())


def tempfile_sync(actor, engine, version):
    """The removed `collect_hf_weights` hand-off, for comparison only."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file, save_file

    mine = [(n, t.detach().to("cpu", copy=True)) for n, t in actor.hf_weights()]
    box = [tempfile.mkdtemp(prefix="dapo_sync_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() != 0:
        save_file(dict(mine), str(Path(box[0]) / f"stage{ps.get_pipeline_model_parallel_rank()}.safetensors"))
    dist.barrier()
    if dist.get_rank() != 0:
        return 0
    for f in sorted(Path(box[0]).glob("stage*.safetensors")):
        mine.extend(load_file(str(f)).items())
        f.unlink()
    Path(box[0]).rmdir()
    engine.update_weights_from_tensor(mine, weight_version=version)
    return sum(t.numel() * t.element_size() for _, t in mine)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["stream", "tempfile"], default="stream")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--bucket-mb", type=float, default=64)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="model folder root (default: a temp folder on rank 0's TMPDIR)")
    ap.add_argument("--out", default=None, help="write the rank-0 summary JSON here")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.models.tiny import make_tiny_hf_model
    from dapo_megatron.parallel import ParallelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig
    from dapo_megatron.train.weight_stream import WeightStream

    torch.set_num_threads(1)
    parallel.initialize(ParallelConfig(pipeline_model_parallel_size=2), seed=1)
    rank = dist.get_rank()
    root = Path(args.workdir or os.environ.get("TMPDIR", "/tmp")) / f"bench_ws_{os.environ.get('MASTER_PORT', '0')}"
    path = root / "model"
    if rank == 0:
        make_tiny_hf_model(path, "qwen2.5", seed=0, vocab_size=args.vocab, hidden_size=args.hidden,
                           intermediate_size=args.hidden * 3, num_hidden_layers=args.layers, num_attention_heads=8,
                           num_key_value_heads=2)
    dist.barrier()
    actor = Actor(ModelConfig(path=str(path)), ActorConfig(global_batch_size=2, micro_batch_size=1),
                  PolicyLossConfig(), pad_id=0)
    engine = None
    if rank == 0:
        from dapo_megatron.rollout.engine import Engine

        engine = Engine(str(path), max_batch_size=1)
        with torch.no_grad():  # HF maps the safetensors file lazily: make the engine's weights resident first,
            for p in engine.model.parameters():  # or the first write into them counts as sync memory
                p.mul_(1.0)
    with torch.no_grad():  # move the trainer's weights away from the engine's, so every sync really changes them
        for p in actor.model.parameters():
            p.add_(0.01)
    dist.barrier()
    seconds, nbytes, growth = 0.0, 0, 0.0
    for v in range(1, args.syncs + 1):
        dist.barrier()
        before, sampler = _rss_mb(), PeakRSS()
        t0 = time.perf_counter()
        if args.mode == "stream":
            stream = WeightStream(actor, dst=0, bucket_mb=args.bucket_mb)
            n = stream.run(lambda b: engine.update_weights_from_buckets(b, weight_version=v) if engine else None)
        else:
            n = tempfile_sync(actor, engine, v)
        dist.barrier()
        seconds += time.perf_counter() - t0
        growth = max(growth, sampler.stop() - before)
        nbytes += n if rank == 0 else 0
        # bit-for-bit: every stage's tensors against the engine's (sent again to rank 0, outside the timing)
        check = WeightStream(actor, dst=0, bucket_mb=args.bucket_mb)
        if rank == 0:
            params = dict(engine.model.named_parameters(remove_duplicate=False))
            bad = []
            check.run(lambda buckets: bad.extend(n for b in buckets for n, t in b if not torch.equal(params[n], t)))
            assert not bad, f"engine differs from the trainer after sync {v}: {bad[:3]}"
        else:
            check.run()
        with torch.no_grad():
            for p in actor.model.parameters():
                p.add_(0.01)
    peak = torch.tensor([growth], dtype=torch.float64)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    stage_mb = sum(p.numel() * p.element_size() for p in actor.model.parameters()) / 2 ** 20
    stages = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(stages, torch.tensor([stage_mb], dtype=torch.float64))
    if rank == 0:
        gb = nbytes / 1e9
        out = {"mode": args.mode, "model_gb": gb / args.syncs, "s_per_gb": seconds / gb, "bucket_mb": args.bucket_mb,
               "peak_rss_growth_mb": [round(float(x), 1) for x in peaks],
               "stage_params_mb": [round(float(x), 1) for x in stages], "bit_exact": True}
        print(json.dumps(out), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(out))
        engine.shutdown()
    parallel.destroy()


if __name__ == "__main__":
    main()
