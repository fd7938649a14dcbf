"""Verifier throughput (responses/s) through the process pool, with 1 and 2 workers, on MATH-500 answers.

    python tools/bench_reward.py [--types math_dapo math_verify] [--workers 0 1 2] [--repeat 2]
    python tools/bench_reward.py --types math_dapo --baseline-rev 0bc6cfe   # today's math_dapo vs an older one

`--baseline-rev REV` also benchmarks `dapo_megatron/reward/math_dapo.py` as it was at git revision REV (loaded
as `python:_math_dapo_baseline.verify`) on the same responses, in the same run, and prints the ratio.

Responses are the 500 reference answers fed back as model output, half right (`...\\boxed{answer}` /
`Answer: answer`) and half wrong (the next problem's answer), so that math_verify also runs its sympy
comparison. Worker start-up is excluded; `--workers 0` is the in-process baseline (no timeout).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dapo_megatron.reward.pool import VerifierPool  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "math500.jsonl"


def make_pairs(path: Path) -> list[tuple[str, str]]:
    answers = [json.loads(line)["answer"] for line in open(path, encoding="utf-8")]
    pairs = []
    for i, truth in enumerate(answers):
        other = answers[(i + 1) % len(answers)]
        pairs.append((f"We simplify step by step.\nAnswer: {truth}\nSo the answer is $\\boxed{{{truth}}}$.", truth))
        pairs.append((f"We simplify step by step.\nAnswer: {other}\nSo the answer is $\\boxed{{{other}}}$.", truth))
    return pairs


def bench(verifier_type: str, workers: int, pairs, timeout_s: float) -> dict:
    with VerifierPool(verifier_type, num_workers=workers, timeout_s=timeout_s) as pool:
        pool.map(pairs[:8])  # warm the workers' caches
        t0 = time.perf_counter()
        results = pool.map(pairs)
        elapsed = time.perf_counter() - t0
    return {"type": verifier_type, "workers": workers, "responses": len(pairs),
            "seconds": round(elapsed, 3), "responses_per_s": round(len(pairs) / elapsed, 1),
            "correct": sum(r.correct for r in results), "timeouts": sum(r.status == "timeout" for r in results),
            "errors": sum(r.status == "error" for r in results)}


def load_baseline(rev: str) -> str:
    """Write math_dapo.py at `rev` into a temporary importable module; returns its reward.type."""
    source = subprocess.run(["git", "show", f"{rev}:dapo_megatron/reward/math_dapo.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    folder = tempfile.mkdtemp(prefix="bench_reward_")
    Path(folder, "_math_dapo_baseline.py").write_text(source)
    sys.path.insert(0, folder)  # this process and the pool's workers (which inherit the environment)
    os.environ["PYTHONPATH"] = os.pathsep.join([folder, str(REPO), os.environ.get("PYTHONPATH", "")])
    return "python:_math_dapo_baseline.verify"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--types", nargs="+", default=["math_dapo", "math_verify"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--repeat", type=int, default=1, help="repeat the 1000 responses this many times")
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--baseline-rev", default=None, help="also bench math_dapo.py as of this git revision")
    args = p.parse_args(argv)
    pairs = make_pairs(args.data) * args.repeat
    if args.baseline_rev:
        args.types = [load_baseline(args.baseline_rev), *args.types]
    print(f"{'type':<12} {'workers':>7} {'responses':>9} {'seconds':>8} {'resp/s':>9} {'correct':>7} "
          f"{'timeouts':>8} {'errors':>6}")
    rates = {}
    for verifier_type in args.types:
        for workers in args.workers:
            r = bench(verifier_type, workers, pairs, args.timeout_s)
            rates[verifier_type, workers] = r["responses_per_s"]
            name = "baseline" if verifier_type.startswith("python:_math_dapo_baseline") else r["type"]
            print(f"{name:<12} {r['workers']:>7} {r['responses']:>9} {r['seconds']:>8} {r['responses_per_s']:>9} "
                  f"{r['correct']:>7} {r['timeouts']:>8} {r['errors']:>6}", flush=True)
    if args.baseline_rev and "math_dapo" in args.types:
        for workers in args.workers:
            ratio = rates[args.types[0], workers] / rates["math_dapo", workers]
            print(f"math_dapo at {args.baseline_rev} / today, {workers} workers: {ratio:.2f}x the throughput")


if __name__ == "__main__":
    main()
