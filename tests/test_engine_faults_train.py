"""Engine faults in a whole `dapo-megatron train` (embedded engine, toy model): the rows of docs/fault_tolerance.md."""
import gzip
import json
import os
from pathlib import Path

import pytest

from dapo_megatron.models.tiny import make_tiny_hf_model
from tests.helpers.forked import run_cli


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_faults")
    hf = make_tiny_hf_model(root / "hf", "qwen2.5", seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(5) for b in range(5)))
    return hf, data


def _train(toy, run_dir, steps, extra=(), env=None):
    hf, data = toy
    args = [f"model.path={hf}", f"data.path={data}", "data.template={question}", "data.apply_chat_template=false",
            f"trainer.run_dir={run_dir}", f"trainer.num_steps={steps}", "trainer.tensorboard=false",
            "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=2", "rollout.max_response_length=4",
            "dynamic_sampling.enable=false", "reward.num_workers=1",
            "reward.type=python:tests.helpers.toy_reward.even_length",
            "actor.global_batch_size=4", "actor.micro_batch_size=4", *extra]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"dapo_faults_{os.getpid()}_{Path(run_dir).name}.log"
    rc, text, _ = run_cli(["train", *args], env=env, timeout=300, log=log)
    log.unlink(missing_ok=True)
    return rc, text


def _rows(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("weight_sync", ["tensor", pytest.param("disk", marks=pytest.mark.slow)])
def test_corrupt_bucket_is_caught_and_nothing_trains_on_it(toy, tmp_path, weight_sync):
    """corrupt_bucket@2: the sync after step 1 is checked and equal; the one after step 2 carries one tensor off by
    one, the check names it, exit 2, and step 3 (the first to train on those weights' rollout) never runs."""
    run = tmp_path / weight_sync
    rc, text = _train(toy, run, 3, [f"rollout.weight_sync={weight_sync}", "rollout.check_weight_sync=1"],
                      env={"DAPO_FAULT": "corrupt_bucket@2"})
    assert rc == 2, text[-4000:]
    lines = [x for x in text.splitlines() if "differs from the trainer's" in x]
    assert len(lines) == 1 and "Traceback" not in text, text[-4000:]
    assert "weight sync to version 2: the engine's model.embed_tokens.weight" in lines[0], lines[0]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1]  # step 2 stopped at its sync; no step 3
    assert rows[0]["debug/sync_mismatches"] == 0 and rows[0]["debug/sync_tensors_checked"] > 0


def test_hung_weight_update_fails_in_one_line(toy, tmp_path):
    """engine_hang_update@1 with disk sync: the engine's update never answers; one line after
    rollout.weight_sync_timeout_s naming the engine and the stage, exit 2, instead of a hang."""
    rc, text = _train(toy, tmp_path / "hang", 2, ["rollout.weight_sync=disk", "rollout.weight_sync_timeout_s=2"],
                      env={"DAPO_FAULT": "engine_hang_update@1"})
    assert rc == 2, text[-4000:]
    lines = [x for x in text.splitlines() if "weight_sync_timeout_s=2 s" in x]
    assert len(lines) == 1 and "Traceback" not in text, text[-4000:]
    assert "update_weights_from_disk to version 1: engine 0 (inprocess://engine): /update_weights_from_disk" in \
        lines[0], lines[0]


def test_sigkill_of_the_only_engine_mid_rollout_is_restarted_and_the_run_completes(toy, tmp_path):
    """engine_kill@2 with rollout.backend=embedded_http: the only engine dies in step 2's rollout; it is restarted,
    caught up to version 1 from the last synced folder, the lost groups are generated again, and the run trains all
    3 steps with rollout/engine_restarts = 1 from step 2 on and the trainer-engine log-prob gap as small as before."""
    run = tmp_path / "killed"
    rc, text = _train(toy, run, 3, ["rollout.backend=embedded_http", "rollout.health_interval_s=0.5"],
                      env={"DAPO_FAULT": "engine_kill@2"})
    assert rc == 0, text[-4000:]
    assert "DAPO_FAULT=engine_kill@2: SIGKILL of engine pid" in text or "restarting it" in text, text[-4000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout/engine_restarts"] for r in rows] == [0, 1, 1]
    assert all(r["rollout/train_infer_logprob_diff_max"] < 1e-3 for r in rows), rows


def test_hung_weight_update_of_a_supervised_engine_is_restarted_and_synced_again(toy, tmp_path):
    """engine_hang_update@1 with rollout.backend=embedded_http: the update to version 1 misses
    rollout.weight_sync_timeout_s; the engine is restarted (caught up to version 0) and the update sent again; the
    run trains both steps on version-exact samples."""
    run = tmp_path / "resync"
    rc, text = _train(toy, run, 2, ["rollout.backend=embedded_http", "rollout.weight_sync_timeout_s=10"],
                      env={"DAPO_FAULT": "engine_hang_update@1"})
    assert rc == 0, text[-4000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2] and [r["rollout/engine_restarts"] for r in rows] == [0, 1]
    assert rows[1]["rollout/train_infer_logprob_diff_max"] < 1e-3


def test_restarts_past_the_bound_stop_in_one_line_after_a_resumable_checkpoint(toy, tmp_path):
    """rollout.max_engine_restarts=0 and engine_kill@2: step 1 trains, the engine dies in step 2's rollout, which is
    past the bound: one line (the engine, its last log lines, the fix, the checkpoint), exit 2, after a checkpoint of
    step 1 with the rollout state from before step 2's rollout; a resume from it trains step 2 as the uninterrupted
    run would (the same prompts: the same group ids)."""
    run = tmp_path / "bound"
    rc, text = _train(toy, run, 2, ["rollout.backend=embedded_http", "rollout.max_engine_restarts=0",
                                    "rollout.health_interval_s=0.5", "trainer.save_interval=0",
                                    "trainer.dump_rollouts=1"],
                      env={"DAPO_FAULT": "engine_kill@2"})
    assert rc == 2, text[-4000:]
    lines = [x for x in text.splitlines() if "past 0 restart(s)" in x]
    assert len(lines) == 1 and "Traceback" not in text, text[-4000:]
    line = lines[0]
    assert "engine 0 at http://" in line and "DAPO_FAULT=engine_kill@2: SIGKILL of engine pid" in line, line
    ck = run / "checkpoints"
    assert f"the last finished step, 1, is checkpointed: resume with trainer.load={ck} (" in line, line
    assert [r["step"] for r in _rows(run)] == [1]
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_0000001"]
    rc, text = _train(toy, run, 2, ["rollout.backend=embedded_http", f"trainer.load={ck}", "trainer.dump_rollouts=1"])
    assert rc == 0, text[-4000:]
    assert [r["step"] for r in _rows(run)] == [1, 2]
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    with gzip.open(run / "rollouts" / "step_0000002.jsonl.gz", "rt") as f:  # step 2's prompts: none skipped
        assert sorted({json.loads(x)["group_id"] for x in f}) == [2, 3]


def test_sigkill_of_one_of_two_engines_its_requests_finish_on_the_other_and_it_rejoins(toy, tmp_path):
    """Two supervised engines (rollout.sglang_num_servers=2); engine_kill@2:1 kills engine 1 in step 2's rollout (its
    group finishes on engine 0, which serves through it), engine_kill@3:0 kills engine 0 in step 3's: that group can
    only finish on engine 1, so step 3 completes only if engine 1 rejoined (restarted, caught up to version 2)."""
    run = tmp_path / "two"
    rc, text = _train(toy, run, 3, ["rollout.backend=embedded_http", "rollout.sglang_num_servers=2",
                                    "rollout.health_interval_s=0.5"],
                      env={"DAPO_FAULT": "engine_kill@2:1,engine_kill@3:0"})
    assert rc == 0, text[-4000:]
    assert text.count("restarting it") == 2 and "engines: 2 embedded engine(s)" in text, text[-4000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # restarts finished by the end of each rollout: the other engine serves meanwhile, so one may still be under way
    restarts = [r["rollout/engine_restarts"] for r in rows]
    assert restarts[0] == 0 and restarts[1] <= 1 and restarts[2] in (1, 2), restarts
    assert all(r["rollout/train_infer_logprob_diff_max"] < 1e-3 for r in rows), rows


def test_a_hung_generate_is_detected_within_the_request_timeout_and_the_engine_restarted(toy, tmp_path):
    """engine_hang_generate@2: the only engine's generate in step 2 never answers; past rollout.request_timeout_s
    the client reports it, the engine is killed by PID, restarted, caught up to version 1, and the group generated
    again: both steps train, on version-exact samples."""
    run = tmp_path / "hang_generate"
    rc, text = _train(toy, run, 2, ["rollout.backend=embedded_http", "rollout.request_timeout_s=5"],
                      env={"DAPO_FAULT": "engine_hang_generate@2"})
    assert rc == 0, text[-4000:]
    assert "hung in a generate past rollout.request_timeout_s: restarting it" in text, text[-4000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2] and [r["rollout/engine_restarts"] for r in rows] == [0, 1]
    assert rows[1]["rollout/train_infer_logprob_diff_max"] < 1e-3


def _external(root, run_dir, fault=None):
    """An engine someone else runs (rollout.backend=http): the embedded HTTP server, reading the run's sync folder."""
    from dapo_megatron.rollout.server import launch_embedded_server
    from dapo_megatron.train.faults import without_fault

    env = {**without_fault(dict(os.environ)), **({"DAPO_FAULT": fault} if fault else {})}
    return launch_embedded_server(root, EXTERNAL_PORT[0], mode="subprocess", max_batch_size=4,
                                  weights_root=Path(run_dir) / "weight_sync", env=env)


EXTERNAL_PORT = [0]


@pytest.mark.parametrize("comes_back", [False, True])
def test_external_engines_are_waited_for_and_the_run_stops_in_one_line_if_none_comes_back(toy, tmp_path,
                                                                                           comes_back):
    """rollout.backend=http, one engine we do not run, killed in step 2's rollout (engine_kill@2): it is not
    restarted. Nobody restarts it: after rollout.engine_wait_s one line, exit 2, step 1 checkpointed. Its owner
    restarts it (the test, on the same port, once the old process is gone): the trainer finds it within the wait,
    catches it up from the last synced folder (version 1) and trains all 3 steps on version-exact samples."""
    import threading

    from dapo_megatron.rollout.server import free_port

    run = tmp_path / "external"
    EXTERNAL_PORT[0] = free_port()
    first = _external(toy[0], run, fault="engine_kill@2")
    owners = [first]

    def owner():  # someone else's restart: bounded by the process's own death (the trainer's timeout bounds that)
        if first.process.wait(timeout=280) is not None:
            owners.append(_external(toy[0], run))

    helper = threading.Thread(target=owner, daemon=True)
    if comes_back:
        helper.start()
    try:
        rc, text = _train(toy, run, 3, ["rollout.backend=http", f"rollout.urls=[{first.url}]",
                                        f"rollout.engine_wait_s={120 if comes_back else 3}"])
    finally:
        helper.join(timeout=60) if comes_back else None
        for s in owners:
            s.shutdown()
    rows = _rows(run)
    if comes_back:
        assert rc == 0, text[-4000:]
        assert "answers /health again; catching the engines up" in text, text[-4000:]
        assert [r["step"] for r in rows] == [1, 2, 3] and "rollout/engine_restarts" not in rows[0]
        assert all(r["rollout/train_infer_logprob_diff_max"] < 1e-3 for r in rows), rows
        return
    assert rc == 2, text[-4000:]
    lines = [x for x in text.splitlines() if "rollout.engine_wait_s=3 s" in x]
    assert len(lines) == 1 and "Traceback" not in text, text[-4000:]
    assert f"no engine at rollout.urls ({first.url}) answered /health" in lines[0], lines[0]
    assert f"the last finished step, 1, is checkpointed: resume with trainer.load={run / 'checkpoints'}" in lines[0]
    assert [r["step"] for r in rows] == [1]
