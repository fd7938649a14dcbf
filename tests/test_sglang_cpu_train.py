"""End to end with the real PyPI sglang server on CPU: `dapo-megatron train` with rollout.backend=sglang, 3 DAPO steps
of a tiny model, once synchronous and once with rollout.async_steps=1; disk weight sync after every step.

Each run starts (and stops) its own server (~40 s). Needs tools/.venv-sglang (bash tools/setup_sglang_cpu.sh);
skipped with that message otherwise.
"""
import json
from pathlib import Path

import pytest

from dapo_megatron.rollout.sglang_launcher import free_port_block
from tests.helpers.forked import run_cli
from tests.sglang_real import TOOLS_PY, needs_server_venv

pytestmark = [pytest.mark.sglang_cpu, needs_server_venv]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from dapo_megatron.models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("toy")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5", seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    return hf, data


def train(toy, run_dir, *extra):
    hf, data = toy
    args = [f"model.path={hf}", f"data.path={data}", "data.template={question}", "data.apply_chat_template=false",
            f"trainer.run_dir={run_dir}", "trainer.num_steps=3", "trainer.save_interval=0",
            "trainer.tensorboard=false", "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4",
            "rollout.max_response_length=6", "dynamic_sampling.enable=false", "reward.num_workers=1",
            "reward.type=python:tests.helpers.toy_reward.even_length", "actor.global_batch_size=8",
            "actor.micro_batch_size=4", "actor.lr=0.01", "actor.recompute_old_logprobs=true",
            "rollout.backend=sglang", f"rollout.sglang_python={TOOLS_PY}", "rollout.sglang_mem_fraction_static=0.1",
            "rollout.sglang_extra_args=[--max-total-tokens, 4096]", f"rollout.sglang_base_port={free_port_block()}",
            *extra]
    log = Path(run_dir).parent / f"{Path(run_dir).name}.log"
    rc, text, _ = run_cli(["train", *args], timeout=600, log=log)  # kills the run's process group afterwards
    assert rc == 0, f"train failed (rc={rc}):\n{text[-8000:]}"
    assert servers_of(hf) == [], "a server outlived its run"
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def servers_of(model_dir) -> list:
    """PIDs of live sglang processes serving `model_dir` (the run stops its servers by PID on exit)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"sglang.launch_server" in cmd and str(model_dir).encode() in cmd:
            found.append(int(entry.name))
    return found


def check_run(rows, run_dir, lags):
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout/weight_version_lag_max"] for r in rows] == lags
    gaps = [r["rollout/train_infer_logprob_diff_max"] for r in rows]
    print(f"train/inference max |log-prob| gap per step: {gaps}")
    # where the rollout is on-policy SGLang served exactly the trainer's weights (float32 both sides)
    assert all(g < 1e-3 for g, lag in zip(gaps, lags) if lag == 0), gaps
    # the engines received each step's weights through disk: the last folder is the last step's version
    assert [p.name for p in (Path(run_dir) / "weight_sync").glob("weights_v*")] == ["weights_v000003"]
    assert all(r["sync/gb"] > 0 for r in rows)


def test_train_three_steps_synchronous(toy, tmp_path):
    run = tmp_path / "sync"
    rows = train(toy, run)
    check_run(rows, run, [0, 0, 0])


def test_train_three_steps_async_one_step_off_policy(toy, tmp_path):
    run = tmp_path / "async"
    rows = train(toy, run, "rollout.async_steps=1")
    check_run(rows, run, [0, 1, 1])
    gaps = [r["rollout/train_infer_logprob_diff_max"] for r in rows]
    assert gaps[1] > 1e-3 and gaps[2] > 1e-3  # a rollout one version behind: the setting is real
