"""Benchmark the embedded rollout engine and weight sync on a tiny random model (CPU by default).

    python tools/bench_rollout.py [--prompts 32] [--max-new-tokens 64] [--out bench.json]

Reports generated tokens/s of
  - the engine at concurrency 1 (one request at a time) and at concurrency 32 (continuous batching), in-process and
    through the HTTP server,
  - plain `transformers.generate` on the same prompts, one at a time and as one left-padded batch,
and weight-sync seconds per GB for the disk mode (safetensors shards + /update_weights_from_disk) and the in-process
tensor mode. Every request generates exactly --max-new-tokens tokens (ignore_eos), so the runs are comparable.
Each rate is the best of --repeats runs (the first run of a shape pays one-off kernel set-up costs).

--threads sets torch's intra-op threads (default 1): on a small machine shared with other jobs, 2+ OpenMP threads
make these small matmuls many times slower whenever a core is busy elsewhere.
"""
import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dapo_megatron.models.tiny import make_tiny_hf_model  # noqa: E402
from dapo_megatron.rollout.client import RolloutClient  # noqa: E402
from dapo_megatron.rollout.engine import Engine  # noqa: E402
from dapo_megatron.rollout.server import launch_embedded_server  # noqa: E402
from dapo_megatron.rollout.weight_sync import make_weight_sync  # noqa: E402


def model_overrides(hidden: int, layers: int, vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 1),
            "num_key_value_heads": max(hidden // 128, 1), "max_position_embeddings": 4096}


def make_prompts(n: int, length: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (length + i % 8,), generator=g).tolist() for i in range(n)]


def params(max_new_tokens: int) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": 1.0, "ignore_eos": True}


def best_of(repeats: int, fn, *args) -> float:
    return max(fn(*args) for _ in range(repeats))


def engine_tokens_per_s(client: RolloutClient, prompts: list, max_new_tokens: int, concurrency: int) -> float:
    async def run():
        sem = asyncio.Semaphore(concurrency)

        async def one(p):
            async with sem:
                return await client.generate(p, params(max_new_tokens))

        return await asyncio.gather(*[one(p) for p in prompts])

    start = time.perf_counter()
    outs = asyncio.run(run())
    seconds = time.perf_counter() - start
    return sum(len(o[0]["output_ids"]) for o in outs) / seconds


def hf_tokens_per_s(model, prompts: list, max_new_tokens: int, batch: int) -> float:
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 eos_token_id=None, pad_token_id=0)
        tokens += (out.shape[1] - width) * len(chunk)
    return tokens / (time.perf_counter() - start)


def bench_generation(args, root: Path) -> dict:
    path = make_tiny_hf_model(root / "gen", family="qwen2.5", **model_overrides(args.hidden, args.layers, args.vocab))
    prompts = make_prompts(args.prompts, args.prompt_len)
    n_single = max(4, args.prompts // 4)  # one-at-a-time runs are slow: a subset is enough for a rate
    res = {}
    engine = Engine(path, max_batch_size=64)
    try:
        client = RolloutClient(engine=engine, max_concurrency=64)
        r, m = args.repeats, args.max_new_tokens
        res["engine_c1_tok_s"] = best_of(r, engine_tokens_per_s, client, prompts[:n_single], m, 1)
        res["engine_c32_tok_s"] = best_of(r, engine_tokens_per_s, client, prompts, m, 32)
        res["hf_generate_b1_tok_s"] = best_of(r, hf_tokens_per_s, engine.model, prompts[:n_single], m, 1)
        res["hf_generate_b32_tok_s"] = best_of(r, hf_tokens_per_s, engine.model, prompts, m, 32)
        with launch_embedded_server(path, 0, engine=engine) as server:
            http = RolloutClient([server.url], max_concurrency=64)
            res["engine_http_c32_tok_s"] = best_of(r, engine_tokens_per_s, http, prompts, m, 32)
            engine = None  # shut down with the server
    finally:
        if engine is not None:
            engine.shutdown()
    return res


def bench_sync(args, root: Path) -> dict:
    path = make_tiny_hf_model(root / "sync", family="qwen2.5",
                              **model_overrides(args.sync_hidden, args.sync_layers, args.vocab))
    engine = Engine(path)
    try:
        named = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
        gb = sum(t.numel() * t.element_size() for _, t in named) / 1e9
        res = {"sync_model_gb": gb}
        client = RolloutClient(engine=engine)
        for mode, sync in (("disk", make_weight_sync("disk", client, path, root / "sync_out")),
                           ("tensor", make_weight_sync("tensor", engine))):
            times = []
            for _ in range(args.sync_repeats):
                sync.sync(named)
                times.append(sync.last_sync["seconds"])
            res[f"{mode}_sync_s_per_gb"] = min(times) / gb
    finally:
        engine.shutdown()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sync-hidden", type=int, default=1024, help="model for the weight-sync timing")
    p.add_argument("--sync-layers", type=int, default=8)
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per generation rate")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        res = {"torch_threads": torch.get_num_threads(), **bench_generation(args, Path(tmp))}
        if not args.skip_sync:
            res.update(bench_sync(args, Path(tmp)))
    print_results(res, args.out)
    return res


def print_results(res: dict, out=None) -> None:
    """One aligned line per result; the same as JSON in `out` when given."""
    for key, value in res.items():
        print(f"{key:>24}: {value:,.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if out:
        Path(out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
