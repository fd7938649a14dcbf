"""Embedded engine vs the real PyPI sglang server on CPU, side by side on tools/bench_rollout.py's workload, and disk
weight sync to real sglang.

    bash tools/setup_sglang_cpu.sh && python tools/bench_sglang_cpu.py [--threads 1] [--out bench.json]

Generated tokens/s at concurrency 1 and 32 (every request runs to --max-new-tokens, ignore_eos; best of --repeats),
for our engine through the trainer's RolloutClient in-process, and for sglang (tools/.venv-sglang, started by
rollout/sglang_launcher.py with its CPU flags, float32) through the same client over HTTP. Then GB/s of
DiskWeightSync (safetensors shards + /update_weights_from_disk) into that sglang server, for a larger model.
OMP_NUM_THREADS=--threads is set for the server too. sglang on CPU here runs its torch_native attention and
forward_native layers (no sgl_kernel CPU build on PyPI: tools/sgl_kernel_standin), not its AMX kernels.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_rollout import best_of, engine_tokens_per_s, make_prompts, model_overrides, print_results  # noqa: E402

from dapo_megatron.models.tiny import make_tiny_hf_model  # noqa: E402
from dapo_megatron.rollout.client import RolloutClient  # noqa: E402
from dapo_megatron.rollout.engine import Engine  # noqa: E402
from dapo_megatron.rollout.sglang_launcher import SGLangServers, free_port_block  # noqa: E402
from dapo_megatron.rollout.weight_sync import make_weight_sync  # noqa: E402

TOOLS_PY = Path(__file__).resolve().parent / ".venv-sglang" / "bin" / "python"


def sglang(model, log_dir) -> SGLangServers:
    return SGLangServers(model, mem_fraction_static=0.1, base_port=free_port_block(), python=str(TOOLS_PY),
                         log_dir=log_dir, startup_timeout_s=600, device="cpu",
                         extra_args=["--max-total-tokens", "16384"])  # started (and stopped) by `with`


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sync-hidden", type=int, default=1024)
    p.add_argument("--sync-layers", type=int, default=8)
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not TOOLS_PY.exists():
        sys.exit(f"{TOOLS_PY} not found: run bash tools/setup_sglang_cpu.sh first")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's processes inherit it
    res = {"threads": args.threads, "load_before": os.getloadavg()[0]}
    r, m = args.repeats, args.max_new_tokens
    prompts = make_prompts(args.prompts, args.prompt_len)
    n1 = max(4, args.prompts // 4)
    with tempfile.TemporaryDirectory(prefix="bench_sglang_cpu_") as tmp:
        tmp = Path(tmp)
        gen = make_tiny_hf_model(tmp / "gen", family="qwen2.5", **model_overrides(args.hidden, args.layers,
                                                                                     args.vocab))
        engine = Engine(gen, max_batch_size=64)
        try:
            client = RolloutClient(engine=engine, max_concurrency=64)
            res["engine_c1_tok_s"] = best_of(r, engine_tokens_per_s, client, prompts[:n1], m, 1)
            res["engine_c32_tok_s"] = best_of(r, engine_tokens_per_s, client, prompts, m, 32)
        finally:
            engine.shutdown()
        with sglang(gen, tmp / "logs_gen") as servers:
            client = servers.client(max_concurrency=64, request_timeout_s=1200)
            res["sglang_c1_tok_s"] = best_of(r, engine_tokens_per_s, client, prompts[:n1], m, 1)
            res["sglang_c32_tok_s"] = best_of(r, engine_tokens_per_s, client, prompts, m, 32)
        res["engine_over_sglang_c1"] = res["engine_c1_tok_s"] / res["sglang_c1_tok_s"]
        res["engine_over_sglang_c32"] = res["engine_c32_tok_s"] / res["sglang_c32_tok_s"]
        big = make_tiny_hf_model(tmp / "sync", family="qwen2.5",
                                 **model_overrides(args.sync_hidden, args.sync_layers, args.vocab))
        from transformers import AutoModelForCausalLM

        named = list(AutoModelForCausalLM.from_pretrained(str(big), dtype=torch.float32).state_dict().items())
        gb = sum(t.numel() * t.element_size() for _, t in named) / 1e9
        res["sync_model_gb"] = gb
        with sglang(big, tmp / "logs_sync") as servers:
            sync = make_weight_sync("disk", servers.client(request_timeout_s=1200), big, tmp / "sync_out")
            seconds = []
            for _ in range(args.sync_repeats):
                sync.sync(named)
                seconds.append(sync.last_sync["seconds"])
        res["sglang_disk_sync_gb_s"] = gb / min(seconds)
    res["load_after"] = os.getloadavg()[0]
    print_results(res, args.out)
    return res


if __name__ == "__main__":
    main()
