"""Variable-length train step: packed (padding-free) vs padded micro-batches on the same long-tailed responses.

    python tools/bench_step.py --lengths longtail [--steps 2] [--warmup 1] [--max-tokens 2048] [--threads 1]

DAPO's responses run from a few hundred to 20k tokens with a long tail; padding each micro-batch to its longest
wastes most of the layers' compute there. Both layouts train the bench model (bench_common.make_model) on the same
samples: 64 responses per step, 48-token prompts, response lengths log-normal (median 128) clipped to 16..1024
(seeded, identical for both), random token ids, advantages +-1. Per step: the old-log-prob pass
(`Actor.compute_logprobs`) and one optimizer step (`Actor.train_step`), each timed. Padded: micro-batches of
--micro-batch-size sequences right-padded to their longest. Packed: sequences end to end, token-balanced within
--max-tokens per micro-batch. Each layout runs in its own process, so the peak memory (PSS of the process) is its own.
"""
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def response_lengths(n: int, seed: int, low: int = 16, high: int = 1024, median: int = 128) -> list[int]:
    rng = random.Random(seed)
    return [min(high, max(low, int(rng.lognormvariate(math.log(median), 1.0)))) for _ in range(n)]


def make_samples(n, seed, vocab, prompt_tokens):
    from dapo_megatron.rollout.sample import Sample

    rng = random.Random(seed + 1)
    out = []
    for i, r in enumerate(response_lengths(n, seed)):
        out.append(Sample(prompt_ids=[rng.randrange(5, vocab) for _ in range(prompt_tokens)],
                          response_ids=[rng.randrange(5, vocab) for _ in range(r)], rollout_logprobs=[-2.0] * r,
                          metadata={"advantage": 1.0 if i % 2 else -1.0}))
    return out


def worker(a) -> None:
    """One layout in this process (world of one): warm-up + measured steps; writes result.json."""
    import torch

    from dapo_megatron import parallel
    from dapo_megatron.algo.loss import PolicyLossConfig
    from dapo_megatron.models import ModelConfig
    from dapo_megatron.train.actor import Actor, ActorConfig

    torch.set_num_threads(a.threads)
    parallel.initialize(parallel.ParallelConfig(), seed=a.seed)
    packed = a.longtail_worker == "packed"
    n = a.prompts * a.group
    cfg = ActorConfig(global_batch_size=n, micro_batch_size=a.micro_batch_size, lr=1e-6, weight_decay=0.0,
                      use_remove_padding=packed, max_tokens_per_microbatch=a.max_tokens if packed else None)
    actor = Actor(ModelConfig(path=str(Path(a.work) / "model")), cfg, PolicyLossConfig(), pad_id=0)
    rec = {"logprob_s": [], "train_s": [], "tokens": [], "response_tokens": [], "microbatches": []}
    for step in range(a.warmup + a.steps):
        samples = make_samples(n, a.seed + step, a.vocab, bc.PROMPT_TOKENS)
        t0 = time.perf_counter()
        actor.compute_logprobs(samples)
        t1 = time.perf_counter()
        actor.train_step(samples)
        t2 = time.perf_counter()
        if step >= a.warmup:
            rec["logprob_s"].append(t1 - t0)
            rec["train_s"].append(t2 - t1)
            rec["tokens"].append(sum(len(s.prompt_ids) + len(s.response_ids) for s in samples))
            rec["response_tokens"].append(sum(len(s.response_ids) for s in samples))
            rec["microbatches"].append(len(actor._layout(samples)))
    (Path(a.work) / f"longtail_{a.longtail_worker}.json").write_text(json.dumps(rec))
    parallel.destroy()


def run(a, work: Path) -> list:
    results = []
    for layout in ("padded", "packed"):
        run_dir = bc.fresh_dir(work / f"longtail_{layout}")
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_step.py"), "--longtail-worker", layout,
               "--work", str(work), *[x for k in ("steps", "warmup", "prompts", "group", "micro_batch_size", "seed",
                                                  "threads", "vocab", "max_tokens")
                                      for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
               "PYTHONPATH": os.pathsep.join([str(bc.REPO / "tools"), str(bc.REPO), os.environ.get("PYTHONPATH", "")])}
        rc, wall, peak = bc.run_measured(cmd, env, run_dir / "log.txt", a.timeout)
        if rc:
            sys.exit(f"longtail {layout} failed with exit code {rc}; see {run_dir / 'log.txt'}")
        r = json.loads((work / f"longtail_{layout}.json").read_text())
        train, logp = bc.median(r["train_s"]), bc.median(r["logprob_s"])
        tokens = bc.median(r["tokens"])
        results.append({"name": layout, "train_s": train, "logprob_s": logp, "train_tok_s": tokens / train,
                        "logprob_tok_s": tokens / logp, "tokens": tokens,
                        "response_tokens": bc.median(r["response_tokens"]),
                        "microbatches": r["microbatches"], "wall_s": wall, **peak})
    return results


def print_table(results: list, a) -> None:
    lengths = response_lengths(a.prompts * a.group, a.seed + a.warmup)
    print(f"\nresponse lengths of the first measured step: min {min(lengths)}, "
          f"median {sorted(lengths)[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
    print(f"{'':16}{'train s':>9}{'train tok/s':>13}{'old-logp s':>12}{'logp tok/s':>12}{'peak PSS GiB':>14}"
          f"{'micro-batches':>15}")
    for r in results:
        print(f"{r['name']:16}{r['train_s']:9.2f}{r['train_tok_s']:13.0f}{r['logprob_s']:12.2f}"
              f"{r['logprob_tok_s']:12.0f}{r['peak_pss_gib']:14.2f}{str(r['microbatches']):>15}")
    by = {r["name"]: r for r in results}
    if "packed" in by and "padded" in by:
        p, q = by["packed"], by["padded"]
        print(f"{'packed / padded':16}{'':9}{p['train_tok_s'] / q['train_tok_s']:12.2f}x{'':12}"
              f"{p['logprob_tok_s'] / q['logprob_tok_s']:11.2f}x{p['peak_pss_gib'] / q['peak_pss_gib']:13.2f}x")
    print(f"(tokens per step: {by[results[0]['name']]['tokens']:.0f} prompt + response, "
          f"{by[results[0]['name']]['response_tokens']:.0f} response)")
