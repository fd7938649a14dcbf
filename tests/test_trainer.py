"""End to end: the DAPO loop through the CLI (embedded engine, megatron actor over gloo), checkpoints, exact resume."""
import json
import os
from pathlib import Path

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.engine_load import WALL_CLOCK_METRICS
from tests.helpers.forked import run_cli

REPO = Path(__file__).resolve().parents[1]
READ_CKPT = REPO / "tests" / "dist_scripts" / "read_checkpoint.py"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5", seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    return hf, data


def _args(toy, run_dir, steps, tp=1, extra=(), pp=1):
    hf, data = toy
    return [f"model.path={hf}", f"data.path={data}", "data.template={question}", "data.apply_chat_template=false",
            f"trainer.run_dir={run_dir}", f"trainer.num_steps={steps}", "trainer.save_interval=2",
            "trainer.tensorboard=false", "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4",
            "rollout.max_response_length=6", "rollout.deterministic=true", "dynamic_sampling.enable=false", "reward.num_workers=1",
            "reward.type=python:tests.helpers.toy_reward.even_length",
            "actor.global_batch_size=8", "actor.micro_batch_size=4", "actor.lr=0.001",
            f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}", *extra]


def _train(args, env=None, check=True):
    # Output goes to files, not pipes: after a SIGKILL the verifier pool's orphans would hold pipes open.
    # `dapo-megatron train` as a process of its own, forked from a warm one (tests/helpers/forked.py); whatever
    # the run leaves behind is killed with its process group.
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"dapo_train_{os.getpid()}_{len(args)}.log"
    rc, text, _ = run_cli(["train", *args], env=env, timeout=600, log=log)
    log.unlink()
    if check and rc != 0:
        pytest.fail(f"train failed (rc={rc}):\n{text[-8000:]}")
    return rc


def _metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time") and k not in WALL_CLOCK_METRICS and k != "step"}
            | {"step": r["step"]} for r in rows]


def _weights(torchrun, ckpt_dir, tmp_path):
    out = tmp_path / f"w_{Path(ckpt_dir).parent.parent.name}_{Path(ckpt_dir).name}.pt"
    torchrun(READ_CKPT, 1, ckpt_dir, out)
    return torch.load(out)


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)], ids=["tp2", "pp2"])
def test_dapo_steps_sync_and_checkpoint(toy, tmp_path, torchrun, tp, pp):
    run = tmp_path / "run"
    _train(_args(toy, run, steps=3, tp=tp, pp=pp, extra=[f"eval.path={toy[1]}", "eval.n_samples=2", "eval.max_prompts=5",
                                                 "actor.max_tokens_per_microbatch=48",
                                                 "trainer.eval_interval=3"]))
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["actor/pg_loss"] == r["actor/pg_loss"] and abs(r["actor/pg_loss"]) < 10  # finite
        assert r["actor/grad_norm"] > 0
        # the engine's log-probs equal the trainer's: weight sync (TP-gathered, QKV/gate-up unfused) is exact
        assert r["rollout/train_infer_logprob_diff_max"] < 1e-4
        # two mini-batches per step: the second is off-policy, so the ratio moved and clipping is measured
        assert 0.0 <= r["actor/pg_clipfrac_high"] <= 1.0 and 0.0 <= r["actor/pg_clipfrac_low"] <= 1.0
    assert "eval/avg@2" not in rows[1] and rows[2]["eval/num_prompts"] == 5  # avg@k every eval_interval steps
    assert 0.0 <= rows[2]["eval/avg@2"] <= 1.0
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    assert not list(ckpt.glob("*.tmp"))
    state = json.loads((ckpt / "iter_0000003" / "trainer_state.json").read_text())
    assert state["iteration"] == 3 and state["rollout"]["buffer"]
    final = _weights(torchrun, ckpt / "iter_0000003" / "model", tmp_path)
    from safetensors.torch import load_file

    init = load_file(str(toy[0] / "model.safetensors"))
    emb, real = final["embedding.word_embeddings.weight"], init["model.embed_tokens.weight"]
    # Megatron's vocabulary padding (make_vocab_size_divisible_by=128 x TP): the padded rows never get a gradient
    assert emb.shape[0] == 128 * tp and emb.shape[1:] == real.shape[1:] and not emb[real.shape[0]:].any()
    assert not torch.equal(emb[:real.shape[0]], real)  # training moved the weights
    assert json.loads((run / "config.json").read_text())["parallel"]["pipeline_model_parallel_size"] == pp


@pytest.mark.dist
@pytest.mark.slow  # ~2 min; tests/test_checkpoint_resume.py::test_kill_mid_log_then_resume_is_exact is the default one
def test_resume_after_sigkill_is_exact(toy, tmp_path, torchrun):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    # vocabulary 128 padded to a multiple of 64 x TP: the same 128 rows at TP=1 and TP=2, so the TP=2 resume below
    # loads this TP=1 checkpoint (a checkpoint loads at the TP sizes with its padded vocabulary, as in Megatron-LM)
    pad = ["model.make_vocab_size_divisible_by=64"]
    _train(_args(toy, straight, steps=4, extra=pad))
    rc = _train(_args(toy, crashed, steps=4, extra=pad), env={"DAPO_FAULT": "train@3"}, check=False)
    assert rc != 0  # killed in the middle of step 3, after checkpoint iter_0000002
    assert (crashed / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    _train(_args(toy, crashed, steps=4, extra=[*pad, f"trainer.load={crashed / 'checkpoints'}"]))
    a_rows, b_rows = _metrics(straight), _metrics(crashed)
    diffs = [(a["step"], k, a.get(k), b.get(k)) for a, b in zip(a_rows, b_rows) for k in a.keys() | b.keys()
             if a.get(k) != b.get(k)]
    assert len(a_rows) == len(b_rows) == 4 and not diffs  # same rewards, losses, clip fractions, step by step
    a = _weights(torchrun, straight / "checkpoints" / "iter_0000004" / "model", tmp_path)
    b = _weights(torchrun, crashed / "checkpoints" / "iter_0000004" / "model", tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise

    # Resume the same checkpoint at TP=2: the resharded model reproduces the engine's log-probs.
    other = tmp_path / "tp2"
    _train(_args(toy, other, steps=3, tp=2, extra=[*pad, f"trainer.load={crashed / 'checkpoints' / 'iter_0000002'}"]))
    rows = _metrics(other)
    assert [r["step"] for r in rows] == [3]
    assert rows[0]["rollout/train_infer_logprob_diff_max"] < 1e-4
