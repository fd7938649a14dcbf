"""One DAPO step, ours vs TRL's GRPOTrainer (loss_type="dapo"), same workload, same machine, one invocation.

    python tools/bench_step.py [--steps 3] [--warmup 1] [--threads 1] [--trl-venv tools/.venv-trl] [--profile]

Workload (both sides): a random-init Qwen2.5-style model (4 layers, hidden 256, vocab 32,768, tied embeddings) from
one HF folder, 8 prompts x 8 responses per step, every response exactly --max-new-tokens long (the tokenizer's EOS id
lies outside the model's vocabulary, so nothing can stop early), temperature 1, Clip-Higher eps 0.2/0.28, no KL,
token-mean loss, one optimizer step per rollout in micro-batches of 8, AdamW lr 1e-6, grad clip 1.0, fp32, the same
rule reward (bench_common.parity_verifier, +1/-1), scored in-process on both sides.
Ours runs with dynamic sampling off (TRL has none) and, as TRL does when it generates once per optimizer step, with
the engine's log-probs as the old policy (actor.recompute_old_logprobs=false); --variant adds runs of ours with other
trainer overrides (e.g. our default, recompute on). TRL is installed into its own venv on first use (never into the
project's).

Per side: median seconds per step over the measured steps (our step = rollout + old log-probs + train + sync; the
final checkpoint save is left out), generated tokens/s over the rollout phase, trained tokens/s (prompt + response
tokens through forward and backward) over the train phase, and the peak RSS of the whole process tree.
--profile adds a py-spy run of ours and prints where the time goes.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0"]
PHASES = ("rollout", "old_logprobs", "train", "rollout_wait", "sync")  # rollout_wait: async_steps=1 only
TRAIN_FRAME = "train_step (dapo_megatron/train/actor.py"
PROFILE_PHASES = {
    "rollout (stage.collect)": "collect (dapo_megatron/train/stages.py",
    "  engine thread (_loop)": "_loop (dapo_megatron/rollout/engine.py",
    "old log-probs": "compute_logprobs (dapo_megatron/train/actor.py",
    "train (train_step)": "train_step (dapo_megatron/train/actor.py",
    "  log-probs + entropy, fwd+bwd": "dapo_megatron/train/logprobs.py",
    "  LM head fwd (response positions)": "_postprocess (core/models/gpt/gpt_model.py",
    "  optimizer.step": "step (core/optimizer/",
    "sync (sync_weights)": "sync_weights (dapo_megatron/train/stages.py",
    "checkpoint save": "save_checkpoint (dapo_megatron/train/checkpoint.py",
}  # label -> substring of a py-spy frame


def our_config(a, work: Path, run_dir: Path) -> Path:
    cfg = {
        "model": {"path": str(work / "model")},
        "data": {"path": str(work / "prompts.jsonl"), "template": "{question}", "apply_chat_template": False,
                 "shuffle": False},
        "rollout": {"backend": "embedded", "rollout_batch_size": a.prompts, "n_samples_per_prompt": a.group,
                    "max_response_length": a.max_new_tokens, "temperature": 1.0, "engine_max_batch_size": 64},
        "dynamic_sampling": {"enable": False},
        "reward": {"type": "python:bench_common.parity_verifier", "num_workers": 0},
        "overlong_buffer": {"enable": False},
        "algorithm": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean"},
        "actor": {"global_batch_size": a.prompts * a.group, "micro_batch_size": a.micro_batch_size, "lr": 1e-6,
                  "weight_decay": 0.0, "clip_grad": 1.0, "recompute_old_logprobs": False},
        "trainer": {"num_steps": a.warmup + a.steps, "run_dir": str(run_dir), "tensorboard": False,
                    "save": str(run_dir / "ckpt"), "seed": a.seed},
    }
    path = run_dir / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_ours(a, work: Path, name: str, overrides: list = (), profile_to: Path = None) -> dict:
    run_dir = bc.fresh_dir(work / name)
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "train", "--config", str(our_config(a, work, run_dir)),
           *overrides]
    if profile_to:
        cmd = [str(Path(a.tools_venv) / "bin" / "py-spy"), "record", "--native", "--format", "raw", "--rate", "25",
               "--subprocesses", "-o", str(profile_to), "--", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join([str(bc.REPO / "tools"), str(bc.REPO), os.environ.get("PYTHONPATH", "")])}
    rc, wall, peak = bc.run_measured(cmd, env, run_dir / "log.txt", a.timeout)
    if rc:
        sys.exit(f"ours ({name}) failed with exit code {rc}; see {run_dir / 'log.txt'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][a.warmup:]
    steps = [sum(r.get(f"time/{p}_s", 0.0) for p in PHASES) for r in rows]
    # generation time: with rollout.async_steps=1 it overlaps train, and time/rollout_s is only the hand-over
    rollout = [r.get("time/rollout_generate_s", r["time/rollout_s"]) for r in rows]
    train = [r.get("time/train_s", 0.0) + r.get("time/old_logprobs_s", 0.0) for r in rows]
    phases = {p: bc.median([r.get(f"time/{p}_s", 0.0) for r in rows]) for p in (*PHASES, "rollout_generate")}
    gen = bc.median([r["rollout/response_length_mean"] * a.prompts * a.group for r in rows])
    return {**summarize(a, name, steps, rollout, train, gen, peak, wall, phases), "overrides": " ".join(overrides)}


def run_trl(a, work: Path, name: str, checkpointing: bool) -> dict:
    python = bc.ensure_venv(Path(a.trl_venv), TRL_PACKAGES, check="import trl")
    out = bc.fresh_dir(work / name) / "result.json"
    cmd = [str(python), __file__, "--trl-worker", "--work", str(work), "--trl-out", str(out.parent),
           "--trl-checkpointing", str(int(checkpointing)), *_shared_args(a)]
    rc, wall, peak = bc.run_measured(cmd, {**os.environ, "OMP_NUM_THREADS": str(a.threads)},
                                     out.parent / "log.txt", a.timeout)
    if rc:
        sys.exit(f"TRL ({name}) failed with exit code {rc}; see {out.parent / 'log.txt'}")
    r = json.loads(out.read_text())
    w = a.warmup
    steps, rollout = r["step_s"][w:], r["rollout_s"][w:]
    train = [s - g for s, g in zip(steps, rollout)]
    phases = {"rollout": bc.median(rollout), "train": bc.median(train)}
    return summarize(a, name, steps, rollout, train, bc.median(r["generated"][w:]), peak, wall, phases)


def summarize(a, name, steps, rollout, train, generated, peak, wall, phases) -> dict:
    trained = (a.prompt_tokens + a.max_new_tokens) * a.prompts * a.group
    return {"name": name, "step_s": bc.median(steps), "steps": steps, "gen_tok_s": generated / bc.median(rollout),
            "train_tok_s": trained / bc.median(train), "generated_per_step": generated, **peak,
            "wall_s": wall, "phases_s": phases}


def _shared_args(a) -> list:
    keys = ("steps", "warmup", "prompts", "group", "max_new_tokens", "micro_batch_size", "seed", "threads")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]


# ---- TRL side (runs inside the TRL venv) -------------------------------------------------------------------
def trl_worker(a) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    work = Path(a.work)
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])

    def reward(prompts, completions, answer, **_):
        return [1.0 if bc.parity_verifier(c, t) else -1.0 for c, t in zip(completions, answer)]

    record = {"step_s": [], "rollout_s": [], "generated": []}
    original = GRPOTrainer._generate_and_score_completions

    def timed_generate(self, inputs):
        t0 = time.perf_counter()
        out = original(self, inputs)
        record["rollout_s"].append(time.perf_counter() - t0)
        record["generated"].append(int(out["completion_mask"].sum()))
        return out

    GRPOTrainer._generate_and_score_completions = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            record["step_s"].append(time.perf_counter() - self.t0)

    batch = a.prompts * a.group
    cfg = GRPOConfig(
        output_dir=a.trl_out, gradient_checkpointing=bool(a.trl_checkpointing),
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0,
        num_generations=a.group, per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=batch // a.micro_batch_size, max_completion_length=a.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", max_steps=a.warmup + a.steps, num_iterations=1, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=a.seed, shuffle_dataset=False,
        disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "model")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=dataset, processing_class=tok,
                          callbacks=[StepTimer()])
    trainer.train()
    (Path(a.trl_out) / "result.json").write_text(json.dumps(record))


def profile_ours(a, work: Path) -> None:
    """A separate run of ours under py-spy (sampling slows it down, so its times are not the measured ones)."""
    bc.ensure_venv(Path(a.tools_venv), ["py-spy"])
    raw = work / "ours_profile.txt"
    run_ours(a, work, "ours_profile", profile_to=raw)
    print(bc.pyspy_summary(raw, PROFILE_PHASES, within=TRAIN_FRAME))


# ---- report -------------------------------------------------------------------------------------------------
def print_table(results: list) -> None:
    print(f"\n{'':16}{'s/step':>8}{'steps/s':>9}{'gen tok/s':>11}{'train tok/s':>13}{'peak PSS GiB':>14}"
          f"{'peak RSS GiB':>14}")
    for r in results:
        print(f"{r['name']:16}{r['step_s']:8.2f}{1 / r['step_s']:9.4f}{r['gen_tok_s']:11.0f}{r['train_tok_s']:13.0f}"
              f"{r['peak_pss_gib']:14.2f}{r['peak_rss_gib']:14.2f}")
    mine = [r for r in results if r["name"].startswith("ours")]
    for ours in mine:
        for trl in (r for r in results if r["name"].startswith("trl")):
            ratio = {k: ours[k] / trl[k] for k in ("gen_tok_s", "train_tok_s", "peak_pss_gib", "peak_rss_gib")}
            print(f"{ours['name'] + '/' + trl['name']:16}{'':8}{trl['step_s'] / ours['step_s']:8.2f}x"
                  f"{ratio['gen_tok_s']:10.2f}x{ratio['train_tok_s']:12.2f}x{ratio['peak_pss_gib']:13.2f}x"
                  f"{ratio['peak_rss_gib']:13.2f}x")
    if mine and len(results) > 1:
        print("(steps/s, tokens/s: higher is better; memory: lower is better. Peak PSS splits pages shared by "
              "forked children; RSS counts them once per process)")
    for r in mine:  # rollout.async_steps=1: how close the step comes to the larger of its two overlapped halves
        ph = r["phases_s"]
        if "rollout.async_steps=1" in r["overrides"]:
            bound = max(ph["rollout_generate"], ph["old_logprobs"] + ph["train"])
            print(f"{r['name']}: step {r['step_s']:.2f} s = {r['step_s'] / bound:.2f}x max(generate "
                  f"{ph['rollout_generate']:.2f} s, old log-probs + train {ph['old_logprobs'] + ph['train']:.2f} s)")
    for r in results:
        print(f"{r['name']} phase medians (s): " + ", ".join(f"{k}={v:.2f}" for k, v in r["phases_s"].items()))


def run_longtail(a, work: Path) -> list:
    import bench_longtail

    bc.fresh_dir(work)
    bc.make_model(work / "model", a.hidden, a.layers, a.vocab, a.seed)
    print(f"machine: {bc.machine_line()}", flush=True)
    results = bench_longtail.run(a, work)
    print(f"machine after: {bc.machine_line()}")
    bench_longtail.print_table(results, a)
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": bc.machine_line(), "results": results}, indent=1))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each side (same for both)")
    p.add_argument("--work", default="/tmp/bench_step", help="scratch folder (model, data, run dirs)")
    p.add_argument("--trl-venv", default=str(bc.REPO / "tools" / ".venv-trl"),
                   help="TRL's venv, created on first use (git-ignored)")
    p.add_argument("--tools-venv", default=str(bc.REPO / "tools" / ".venv-tools"), help="venv for py-spy (--profile)")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                   help="also run ours with these trainer overrides, e.g. "
                        "'recompute:actor.recompute_old_logprobs=true' (repeatable)")
    p.add_argument("--profile", action="store_true", help="also run ours under py-spy and print the hot spots")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--trl-no-checkpointing", action="store_true",
                   help="also run TRL with gradient checkpointing off (GRPOConfig turns it on by default)")
    p.add_argument("--lengths", choices=("fixed", "longtail"), default="fixed",
                   help="fixed: the ours-vs-TRL step; longtail: packed vs padded train step on long-tailed "
                        "response lengths (tools/bench_longtail.py)")
    p.add_argument("--max-tokens", type=int, default=2048, help="longtail: packed tokens per micro-batch")
    p.add_argument("--longtail-worker", help=argparse.SUPPRESS)
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trl-out", help=argparse.SUPPRESS)
    p.add_argument("--trl-checkpointing", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.prompt_tokens = bc.PROMPT_TOKENS
    if a.trl_worker:
        return trl_worker(a)
    if a.longtail_worker:
        import bench_longtail

        return bench_longtail.worker(a)
    work = Path(a.work)
    if a.lengths == "longtail":
        return run_longtail(a, work)
    if not (a.skip_ours and a.skip_trl and not a.profile):
        bc.fresh_dir(work)
        bc.make_model(work / "model", a.hidden, a.layers, a.vocab, a.seed)
        bc.make_prompts(work / "prompts.jsonl", a.prompts * (a.warmup + a.steps), seed=a.seed)
        bc.check_prompts(work / "model", work / "prompts.jsonl")
    print(f"machine: {bc.machine_line()}", flush=True)
    results = []
    if not a.skip_ours:
        results.append(run_ours(a, work, "ours"))
        for spec in a.variant:
            name, _, overrides = spec.partition(":")
            results.append(run_ours(a, work, f"ours_{name}", overrides.split()))
    if not a.skip_trl:
        results.append(run_trl(a, work, "trl", checkpointing=True))
        if a.trl_no_checkpointing:
            results.append(run_trl(a, work, "trl_no_ckpt", checkpointing=False))
    print(f"machine after: {bc.machine_line()}")
    print_table(results)
    if a.profile:
        profile_ours(a, work)
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": bc.machine_line(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
