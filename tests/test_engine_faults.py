"""The one fault-injection mechanism (DAPO_FAULT, train/faults.py): its engine points act where they say."""
import asyncio

import pytest
import torch

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import RolloutClient, RolloutServerError, RolloutTimeoutError
from dapo_megatron.rollout.engine import Engine
from dapo_megatron.rollout.sample import Sample
from dapo_megatron.rollout.server import launch_embedded_server
from dapo_megatron.train import faults

PARAMS = {"max_new_tokens": 4, "temperature": 1.0}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("faults_model") / "m", family="qwen2.5")


def group(g=2):
    return [Sample(prompt_ids=[5, 6, 7], group_id=0, index=i) for i in range(g)]


def test_no_second_fault_variable():
    """DAPO_FAULT is the only switch: the old DAPO_FAULT_AT_STEP is read nowhere."""
    from pathlib import Path

    pkg = Path(faults.__file__).parents[1]
    assert not [p for p in pkg.rglob("*.py") if "DAPO_FAULT_AT_STEP" in p.read_text()]


def test_corrupt_bucket_changes_one_tensor_of_that_sync_only(monkeypatch):
    a, b = torch.zeros(3), torch.ones(2)
    buckets = [[("a", a), ("b", b)], [("c", b)]]
    monkeypatch.setenv(faults.ENV, "corrupt_bucket@2")
    assert list(faults.corrupt_buckets(iter(buckets), 1)) == buckets  # another version: untouched
    out = list(faults.corrupt_buckets(iter(buckets), 2))
    assert [n for bk in out for n, _ in bk] == ["a", "b", "c"]
    assert torch.equal(out[0][0][1], a + 1) and out[0][1][1] is b and out[1] == buckets[1]
    assert torch.equal(a, torch.zeros(3))  # the trainer's own tensor is untouched


def test_hang_generate_in_process_is_cut_by_the_request_timeout(model_path, monkeypatch):
    """engine_hang_generate@1: step 1's rollout (the engine holds version 0) never answers; the client's
    request_timeout_s turns it into a RolloutTimeoutError instead of a hang."""
    engine = Engine(model_path, max_batch_size=4)
    try:
        client = RolloutClient(engine=engine, request_timeout_s=1.0)
        monkeypatch.setenv(faults.ENV, "engine_hang_generate@2")
        assert len(asyncio.run(client.generate_group(group(), PARAMS))) == 2  # version 0 is step 1: no fault
        monkeypatch.setenv(faults.ENV, "engine_hang_generate@1")
        with pytest.raises(RolloutTimeoutError, match="request_timeout_s=1.0"):
            asyncio.run(client.generate_group(group(), PARAMS))
    finally:
        engine.shutdown()


def test_engine_kill_mid_generate_kills_the_engine_process(model_path, monkeypatch):
    """engine_kill@1 in a server process of its own: SIGKILL at the generate, the client says the server died."""
    monkeypatch.setenv(faults.ENV, "engine_kill@1")
    srv = launch_embedded_server(model_path, 0, mode="subprocess", max_batch_size=4)
    try:
        client = RolloutClient([srv.url], request_timeout_s=60, max_retries=1, backoff_s=0.05)
        with pytest.raises(RolloutServerError, match="failed after 2 attempts"):
            asyncio.run(client.generate_group(group(), PARAMS))
        assert srv.process.wait(timeout=30) == -9
    finally:
        srv.shutdown()


# --------------------------------------------------------------------------- bounded weight sync
def _hf_weights(engine):
    from dapo_megatron.rollout.hf_update import _hf_targets

    return [(n, p.detach().clone()) for n, p in _hf_targets(engine.model).items()]


def test_hung_disk_update_fails_in_one_line_naming_engine_and_stage(model_path, tmp_path, monkeypatch):
    """engine_hang_update@1: the engine's /update_weights_from_disk to version 1 never answers; the sync fails after
    rollout.weight_sync_timeout_s with WeightSyncTimeout (a user error: one line, exit 2), not a hang."""
    from types import SimpleNamespace

    from dapo_megatron.rollout.weight_sync import DiskWeightSync, WeightSyncTimeout

    engine = Engine(model_path, max_batch_size=4)
    try:
        client = RolloutClient(engine=engine)
        sync = DiskWeightSync(client, model_path, tmp_path / "sync").bounded_by(SimpleNamespace(
            weight_sync_timeout_s=1.0))
        monkeypatch.setenv(faults.ENV, "engine_hang_update@1")
        with pytest.raises(WeightSyncTimeout) as e:
            sync.sync(_hf_weights(engine))
        line = str(e.value)
        assert "\n" not in line and "engine 0 (inprocess://engine): /update_weights_from_disk" in line
        assert "update_weights_from_disk to version 1" in line and "rollout.weight_sync_timeout_s=1 s" in line
        assert sync.weight_version == 0  # a failed sync leaves the version
        monkeypatch.setenv(faults.ENV, "engine_hang_update@5")
        assert sync.sync(_hf_weights(engine)) == 1 and engine.weight_version == 1  # no fault: it goes through
    finally:
        engine.shutdown()


def test_hung_in_process_tensor_update_exits_2_with_one_line(model_path):
    """tensor sync copies in-process (no timeout argument reaches it): a watchdog prints the one line and exits 2."""
    import os
    import subprocess
    import sys

    code = ("from types import SimpleNamespace\n"
            "from dapo_megatron.rollout.engine import Engine\n"
            "from dapo_megatron.rollout.hf_update import _hf_targets\n"
            "from dapo_megatron.rollout.weight_sync import TensorWeightSync\n"
            f"e = Engine({str(model_path)!r}, max_batch_size=4)\n"
            "s = TensorWeightSync(e).bounded_by(SimpleNamespace(weight_sync_timeout_s=1.0))\n"
            "s.sync([(n, p.detach().clone()) for n, p in _hf_targets(e.model).items()])\n"
            "print('SYNCED', flush=True)\n")
    env = {**os.environ, faults.ENV: "engine_hang_update@1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "SYNCED" not in proc.stdout, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "weight_sync_timeout_s" in x]
    assert lines == ["dapo-megatron: weight sync: the in-process engine's update to version 1, bucket 0 gave no "
                     "answer within rollout.weight_sync_timeout_s=1 s; the engine is hung (see its log), or raise "
                     "rollout.weight_sync_timeout_s if the sync is only slow"], proc.stderr[-3000:]


@pytest.mark.parametrize("overrides, refusal", [
    (["rollout.weight_sync_timeout_s=0"], "rollout.weight_sync_timeout_s=0.0; use seconds > 0"),
    (["rollout.check_weight_sync=-1"], "rollout.check_weight_sync=-1; use 0 (off) or every N syncs"),
    (["rollout.backend=http", "rollout.urls=[http://x:1]", "rollout.check_weight_sync=1"],
     "rollout.check_weight_sync compares the engines' weights digest, which rollout.backend=http engines do not "
     "serve; use rollout.backend=embedded or set it to 0"),
    (["rollout.max_engine_restarts=5"], "rollout.max_engine_restarts bounds the restarts of engines this launch "
     "supervises, and rollout.backend=embedded restarts none; unset it or use rollout.backend=embedded_http"),
    (["rollout.backend=embedded_http", "rollout.deterministic=true"], "rollout.deterministic=true needs the "
     "in-process engine; with rollout.backend=embedded_http unset it, or use rollout.backend=embedded"),
    (["rollout.backend=sglang", "rollout.weight_sync=tensor", "rollout.max_engine_restarts=5"],
     "rollout.max_engine_restarts: SGLang servers are supervised with rollout.weight_sync=disk only (a restarted one "
     "catches up from the last synced folder); use weight_sync=disk or unset it"),
    (["rollout.backend=embedded_http", "rollout.health_interval_s=0"], "rollout.health_interval_s and "
     "rollout.restart_window_s must be > 0 s and rollout.max_engine_restarts >= 0"),
])
def test_fault_tolerance_keys_are_refused_in_one_line(overrides, refusal):
    from dapo_megatron.config import ConfigError, build_config

    with pytest.raises(ConfigError) as e:
        build_config(None, overrides)
    assert str(e.value) == refusal


# --------------------------------------------------------------------------- engine supervision
def _supervised(model_path, root, count, **kw):
    from dapo_megatron.rollout.supervisor import EngineSupervisor
    from dapo_megatron.rollout.server import free_port

    ports, last = [free_port() for _ in range(count)], {}

    def launch(i, env):  # the same arguments every time: same port, same weights root; a fault in engine 0 only
        import os

        env = env if env is not None else dict(os.environ) if i == 0 else faults.without_fault(dict(os.environ))
        return launch_embedded_server(model_path, ports[i], mode="subprocess", max_batch_size=4, weights_root=root,
                                      env=env)

    def catch_up(url):  # disk sync: the restarted engine loads the last synced folder, at its version
        if last:
            asyncio.run(RolloutClient([url]).update_weights_from_disk(last["path"], weight_version=last["v"]))

    return EngineSupervisor(launch, count, catch_up=catch_up, health_interval_s=0.5, **kw), last


def _sync_to_v1(client, model_path, root, last):
    from safetensors.torch import load_file

    from dapo_megatron.rollout.weight_sync import DiskWeightSync

    sync = DiskWeightSync(client, model_path, root, weight_version=client.version)
    weights = {n: t + 0.01 for n, t in load_file(str(model_path / "model.safetensors")).items()}
    assert sync.sync(weights.items()) == 1
    last.update(path=str(root / "weights_v000001"), v=1)


@pytest.mark.parametrize("fault, count", [("engine_kill", 1), pytest.param("engine_kill", 2, marks=pytest.mark.slow),
                                          ("engine_hang_generate", 1)])
def test_a_dead_or_hung_engine_is_restarted_and_the_group_completes(model_path, tmp_path, monkeypatch, fault, count):
    """engine_kill@2: the engine serving step 2's rollout (version 1) is SIGKILLed mid-generate (the supervisor sees
    the process gone); engine_hang_generate@2: its generate hangs (the client reports it past request_timeout_s).
    The engine is killed by PID, started again on the same port, loads the last synced folder (version 1) and is
    put back; the lost request is generated again (on the other engine when there are two); every sample is of
    version 1."""
    monkeypatch.setenv(faults.ENV, f"{fault}@2")  # engine 0's process reads it; a restarted one has none
    sup, last = _supervised(model_path, tmp_path / "sync", count, max_restarts=2)
    try:  # request_timeout_s: a 4-token generate of the toy model takes milliseconds; 15 s is the hang's bound
        client = RolloutClient(sup.urls, request_timeout_s=15, max_retries=3, backoff_s=0.05)
        client.supervisor = sup
        _sync_to_v1(client, model_path, tmp_path / "sync", last)
        pids = [s.process.pid for s in sup.servers]
        client._rr = iter(range(0, 10**6, count))  # the first pick among equals is engine 0, which has the fault
        out = asyncio.run(client.generate_group(group(4), PARAMS))
        assert all(s.weight_version == 1 and s.response_ids and s.finish_reason != "abort" for s in out)
        wait = asyncio.run(sup.wait_up(sup.urls[0], 120))
        assert wait is None and sup.restarts == 1 and sum(a != s.process.pid for a, s in zip(pids, sup.servers)) == 1
    finally:
        sup.shutdown()


def test_restarts_past_the_bound_fail_in_one_line_naming_the_engine_and_its_log(model_path, tmp_path, monkeypatch):
    """max_restarts=0: the first death is past the bound; the waiting request raises EngineRestartsExhausted (a user
    error: one line, exit 2) naming the engine, why, its last log lines and the fix."""
    from dapo_megatron.rollout.supervisor import EngineRestartsExhausted

    monkeypatch.setenv(faults.ENV, "engine_kill@1")
    sup, _ = _supervised(model_path, tmp_path / "sync", 1, max_restarts=0)
    try:
        client = RolloutClient(sup.urls, request_timeout_s=120, max_retries=2, backoff_s=0.05)
        client.supervisor = sup
        with pytest.raises(EngineRestartsExhausted) as e:
            asyncio.run(client.generate_group(group(2), PARAMS))
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"engine 0 at {sup.urls[0]} exited with code -9, past 0 restart(s)")
        assert "DAPO_FAULT=engine_kill@1: SIGKILL of engine pid" in line and "resume from the last checkpoint" in line
        assert sup.restarts == 0
        sup.suspect(sup.urls[0])  # the second request's connection error, after the failure: it must not wait
        assert sup._up[0].is_set()
    finally:
        sup.shutdown()


def test_a_returning_engine_that_nothing_can_catch_up_stops_the_run_in_one_line(model_path):
    """An engine this process does not restart (someone else's, or another node's) came back with older weights, and
    the run's sync cannot catch it up (no disk catch-up: distributed): its answer is not trained on; EnginesLost, one
    line naming the engine and both versions. With a catch-up the same answer triggers it instead (tested in runs)."""
    from dapo_megatron.rollout.client import EnginesLost
    from dapo_megatron.types import WeightVersion

    srv = launch_embedded_server(model_path, 0, mode="thread", max_batch_size=4)  # serves version 0
    try:
        client = RolloutClient([srv.url], request_timeout_s=60, max_retries=1, backoff_s=0.05,
                               weight_version=WeightVersion(2))
        client.external_wait_s = 30.0  # rollout.engine_wait_s: engines it waits for, and does not restart
        with pytest.raises(EnginesLost, match=r"came back serving weight version 0, older than the trainer's 2"):
            asyncio.run(client.generate_group(group(), PARAMS))
        client.external_wait_s = None  # the run's own engine (no return to check): taken as it answers
        samples = group()
        asyncio.run(client.generate_group(samples, PARAMS))
        assert all(s.response_ids for s in samples)
    finally:
        srv.shutdown()
