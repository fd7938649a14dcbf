"""Peak memory and time of chunked vs naive log-prob + entropy (forward + backward) at Qwen's vocabulary, on CPU.

    python tools/bench_logprobs.py                       # 4096 tokens x 151,936 vocab, bf16 logits
    python tools/bench_logprobs.py --dtype fp32 --tokens 2048

Each method runs in its own subprocess. Peak memory is the kernel's peak resident set size (VmHWM in
/proc/self/status), reset through /proc/self/clear_refs just before the measured pass and reported as the rise above
the resident size at that moment (inputs already allocated). This sees every page torch touches, unlike
tracemalloc (blind to torch's allocator) or a sampling thread (can miss short peaks). Large tensors are mmap'd by
glibc and unmapped when freed, so RSS follows torch's live memory. Both numbers include the logits gradient, which
every method must produce (bf16 logits -> bf16 gradient). Time is the best of --repeats forward+backward passes.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dapo_megatron.train.logprobs import vocab_parallel_logprobs  # noqa: E402


def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError as e:
        sys.exit(f"cannot reset the peak RSS through /proc/self/clear_refs ({e}); this benchmark needs Linux")


def _naive(logits, target, temperature):
    x = logits.float()
    logp = torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _chunked(logits, target, temperature, chunk_size):
    return vocab_parallel_logprobs(logits, target, chunk_size=chunk_size, compute_entropy=True,
                                   temperature=temperature)


def worker(args) -> None:
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    logits = torch.empty(args.tokens, args.vocab, dtype=dtype)
    for s in range(0, args.tokens, 256):  # fill in slices: no fp32 [tokens, vocab] temporary before measuring
        logits[s:s + 256] = 4 * torch.randn(min(256, args.tokens - s), args.vocab)
    logits.requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,))
    g_lp, g_ent = torch.randn(args.tokens), torch.randn(args.tokens)

    def step():
        logits.grad = None
        if args.method == "naive":
            lp, ent = _naive(logits, target, args.temperature)
        else:
            lp, ent = _chunked(logits, target, args.temperature, args.chunk_size)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp.detach(), ent.detach()

    before = _status_mib("VmRSS")
    _reset_peak_rss()
    lp, ent = step()
    peak = _status_mib("VmHWM") - before
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak_mib": peak, "seconds": min(times), "lp_sum": lp.double().sum().item(),
                      "ent_sum": ent.double().sum().item(), "grad_abs_sum": logits.grad.double().abs().sum().item()}))


def run_worker(method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
           "--temperature", str(args.temperature), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method} worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the input logits")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        args.method = args.worker
        return worker(args)

    print(f"{args.tokens} tokens x vocab {args.vocab}, {args.dtype} logits, chunk_size {args.chunk_size}, "
          f"{args.threads} threads, forward+backward of log-prob + entropy")
    naive, chunked = run_worker("naive", args), run_worker("chunked", args)
    for key in ("lp_sum", "ent_sum", "grad_abs_sum"):  # both computed the same thing
        rel = abs(naive[key] - chunked[key]) / max(abs(naive[key]), 1e-12)
        if rel > 1e-4:
            sys.exit(f"results differ: {key} naive {naive[key]} vs chunked {chunked[key]}")
    print(f"{'':14}{'naive':>12}{'chunked':>12}{'naive/chunked':>16}")
    print(f"{'peak MiB':14}{naive['peak_mib']:12.0f}{chunked['peak_mib']:12.0f}"
          f"{naive['peak_mib'] / chunked['peak_mib']:15.2f}x")
    print(f"{'seconds':14}{naive['seconds']:12.2f}{chunked['seconds']:12.2f}"
          f"{naive['seconds'] / chunked['seconds']:15.2f}x")


if __name__ == "__main__":
    main()
