"""Benchmark checkpoint conversion on generated ~2 GB bf16 models, dense and MoE: throughput and peak memory, both
directions, each beside a plain safetensors load + save of the same bytes.

    python tools/bench_convert.py [--family dense moe] [--layers N] [--work-dir /tmp] [--keep]

For each family, each direction is put beside a plain safetensors `load_file` + `save_file` of the same shards
(same bytes, same disk, same run, fresh process), run once before and once after the conversions; the ratio is to
their mean, and both are printed so the machine's noise shows. Each run's CPU time (user + system) is printed
beside its wall time: on a shared machine it moves less with the other load. The load average is printed at the
start and end. `--family moe` is Qwen3-30B-A3B-shaped (hidden 2048,
128 experts of 768, top-8, q/k norm) with fewer layers: 48 layers' worth of per-expert tensors is the MoE cost.
The dense model is Qwen2.5-3B-shaped (hidden 2048, ffn 11008, 16 heads / 2 KV heads, vocab 151936, tied embeddings,
qkv bias) with fewer layers, written straight with the safetensors writer (no HF model object). Each direction runs
in a fresh process so its peak RSS (VmHWM) is its own; the baseline is that process's RSS after importing
torch + megatron-core, before converting. The round trip is checked to be bit-identical. Files are in the page
cache (the machine's RAM holds them), so the throughput is not disk-bound; each run starts after an (untimed)
`sync`, so none of them pays for the previous one's writeback.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 11008, "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
    "vocab_size": 151936, "torch_dtype": "bfloat16",
}
MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "vocab_size": 151936, "torch_dtype": "bfloat16",
}


def make_model(out_dir: Path, layers: int, base: dict = CONFIG) -> tuple[int, int]:
    """Write the random bf16 model; return (total bytes, largest tensor bytes)."""
    from dapo_megatron.models.hf_config import arch_from_hf
    from dapo_megatron.models.hf_io import write_hf_checkpoint
    from dapo_megatron.models.tiny import TOY_TOKENIZER_DIR
    from dapo_megatron.models.weights import expected_hf_shapes

    cfg = {**base, "num_hidden_layers": layers}
    shapes = expected_hf_shapes(arch_from_hf(cfg))
    gen = torch.Generator().manual_seed(0)
    tensors = ((n, torch.randn(s, generator=gen, dtype=torch.float32).to(torch.bfloat16) * 0.02)
               for n, s in sorted(shapes.items()))
    src = out_dir.parent / "bench_cfg"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    for f in TOY_TOKENIZER_DIR.iterdir():
        shutil.copy(f, src / f.name)
    write_hf_checkpoint(tensors, out_dir, hf_config_dir=src, max_shard_bytes=10**9)
    sizes = [torch.Size(s).numel() * 2 for s in shapes.values()]
    return sum(sizes), max(sizes)


def child(direction: str, src: str, dst: str) -> None:
    """Run one conversion; print a JSON line with seconds, baseline and peak RSS (bytes)."""
    # Imports are the baseline, not the conversion.
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    from dapo_megatron.models.convert import hf_to_megatron, megatron_to_hf

    base = _rss_now()
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    if direction == "hf-to-megatron":
        hf_to_megatron(src, dst)
    elif direction == "megatron-to-hf":
        megatron_to_hf(src, dst)
    else:  # plain: the same safetensors bytes loaded and saved, no conversion
        from safetensors.torch import load_file, save_file

        Path(dst).mkdir()
        for shard in sorted(Path(src).glob("*.safetensors")):
            save_file(load_file(str(shard)), str(Path(dst) / shard.name))
    secs = time.perf_counter() - start
    print(json.dumps({"seconds": secs, "cpu_seconds": _cpu_seconds() - cpu0, "baseline_rss": base,
                      "peak_rss": _status_kb("VmHWM") * 1024}), flush=True)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its threads: less sensitive than wall time to other load."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_now() -> int:
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    # VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork + exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def run_child(direction: str, src: Path, dst: Path) -> dict:
    import os

    os.sync()  # untimed: every run starts with no dirty pages, not writing behind the previous run's writeback
    proc = subprocess.run([sys.executable, __file__, "--child", direction, str(src), str(dst)], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{direction} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            print("   ", line)
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def check_identical(a: Path, b: Path) -> int:
    from dapo_megatron.models.hf_io import HFCheckpointReader

    with HFCheckpointReader(a) as ra, HFCheckpointReader(b) as rb:
        if sorted(ra.names) != sorted(rb.names):
            raise SystemExit("round trip changed the tensor names")
        for n in ra.names:
            if not torch.equal(ra.get(n), rb.get(n)):
                raise SystemExit(f"round trip changed {n}")
        return len(ra.names)


def bench_family(family: str, layers: int, work: Path) -> list[str]:
    """Plain, both directions, plain again, for one generated model; the table rows."""
    import os

    t0 = time.perf_counter()
    total, largest = make_model(work / "hf", layers, CONFIG if family == "dense" else MOE_CONFIG)
    print(f"{family}: {layers} layers, {total / 1e9:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB "
          f"(embedding), written in {time.perf_counter() - t0:.1f} s", flush=True)
    plains = []
    for i in range(2):
        if i == 1:
            rows = []
            for direction, src, dst in [("hf-to-megatron", work / "hf", work / "mg"),
                                        ("megatron-to-hf", work / "mg", work / "hf_back")]:
                r = run_child(direction, src, dst)
                extra = r["peak_rss"] - r["baseline_rss"]
                rows.append((direction, r, extra))
                print(f"  {direction}: {r['seconds']:.2f} s, peak RSS +{extra / 1e9:.2f} GB", flush=True)
        shutil.rmtree(work / "hf_plain", ignore_errors=True)
        plains.append(run_child("plain", work / "hf", work / "hf_plain"))
        print(f"  plain load+save: {plains[-1]['seconds']:.2f} s", flush=True)
    plain_s = sum(p["seconds"] for p in plains) / 2
    plain_cpu = sum(p["cpu_seconds"] for p in plains) / 2
    plain_extra = max(p["peak_rss"] - p["baseline_rss"] for p in plains)
    out = [f"| {family} | plain load+save | {plains[0]['seconds']:.2f} / {plains[1]['seconds']:.2f} | "
           f"{total / 1e9 / plain_s:.2f} | 1.00x | {plains[0]['cpu_seconds']:.2f} / {plains[1]['cpu_seconds']:.2f} | "
           f"1.00x | +{plain_extra / 1e9:.2f} GB = {plain_extra / largest:.1f}x |"]
    for direction, r, extra in rows:
        out.append(f"| {family} | {direction} | {r['seconds']:.2f} | {total / 1e9 / r['seconds']:.2f} | "
                   f"{plain_s / r['seconds']:.2f}x | {r['cpu_seconds']:.2f} | {plain_cpu / r['cpu_seconds']:.2f}x | "
                   f"+{extra / 1e9:.2f} GB = {extra / largest:.1f}x |")
    n = check_identical(work / "hf", work / "hf_back")
    print(f"  round trip bit-identical: {n} tensors; load average {os.getloadavg()[0]:.2f}", flush=True)
    return out


def main():
    import os

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", choices=["dense", "moe"], default=["dense", "moe"])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (dense 9 -> ~2.0 GB; moe 1 -> ~2.5 GB)")
    p.add_argument("--work-dir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true", help="keep the generated folders")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    load0 = os.getloadavg()
    rows = []
    for family in args.family:
        work = Path(tempfile.mkdtemp(prefix=f"bench_convert_{family}_", dir=args.work_dir))
        try:
            rows += bench_family(family, args.layers or (9 if family == "dense" else 1), work)
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print(f"load average (1/5/15 min) at start {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, at end "
          "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg()))
    print("| model | run | wall s | GB/s | vs plain (wall) | CPU s | vs plain (CPU) | peak RSS over baseline "
          "(x largest tensor) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
