"""Step time of the trainer at TP=1, TP=2 and PP=2 on CPU (gloo), same model and workload: the parallel path's cost.

    python tools/bench_scaling.py [--steps 2] [--warmup 1] [--max-new-tokens 128]

Runs `dapo-megatron train` on bench_step's workload (random-init Qwen2.5-style model, 4 layers, hidden 256, vocab
32,768; 8 prompts x 8 responses; one optimizer step per rollout in micro-batches of 8) once per layout:

  tp1_1thread  1 process, 1 OMP thread          tp2  2 processes (tensor parallel), 1 thread each
  tp1_2thread  1 process, 2 OMP threads         pp2  2 processes (pipeline parallel, 2 layers each), 1 thread each

TP=2 and PP=2 use two cores, so compare them with tp1_2thread (same cores) for the overhead of the parallel path and
with tp1_1thread for the speed-up from the second process. The rollout (embedded engine on rank 0, one thread) is the
same in every layout; the table gives the train phase separately. Ratios are step time over tp1_1thread's.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import bench_step  # noqa: E402

LAYOUTS = {
    "tp1_1thread": (1, []),
    "tp1_2thread": (2, []),
    "tp2": (1, ["parallel.tensor_model_parallel_size=2"]),
    "pp2": (1, ["parallel.pipeline_model_parallel_size=2"]),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {list(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=2, help="measured steps per layout")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/bench_scaling")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    a.prompt_tokens, a.tools_venv = bc.PROMPT_TOKENS, None
    work = bc.fresh_dir(Path(a.work))
    bc.make_model(work / "model", seed=a.seed)
    bc.make_prompts(work / "prompts.jsonl", a.prompts * (a.warmup + a.steps), seed=a.seed)
    print(f"machine: {bc.machine_line()}", flush=True)
    results = []
    for name in a.layouts.split(","):
        a.threads, overrides = LAYOUTS[name]
        r = bench_step.run_ours(a, work, name, overrides)
        results.append(r)
        print(f"{name}: {r['step_s']:.2f} s/step ({bc.machine_line()})", flush=True)
    base = results[0]["step_s"]
    print(f"\n{'layout':14}{'s/step':>9}{'rollout s':>11}{'train s':>9}{'sync s':>8}{'peak PSS GiB':>14}"
          f"{'vs ' + results[0]['name']:>18}")
    for r in results:
        ph = r["phases_s"]
        print(f"{r['name']:14}{r['step_s']:9.2f}{ph['rollout']:11.2f}{ph['train']:9.2f}{ph['sync']:8.2f}"
              f"{r['peak_pss_gib']:14.2f}{r['step_s'] / base:17.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": bc.machine_line(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
