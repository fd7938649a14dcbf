"""Supervision of real SGLang servers (PyPI sglang on CPU) started by our launcher: a dead server is restarted with
the same command, caught up from the last synced folder (disk sync) and put back behind the client
(docs/fault_tolerance.md). Needs tools/.venv-sglang (bash tools/setup_sglang_cpu.sh); skipped otherwise. Two server
starts (~40 s each on 2 idle cores): slow."""
import asyncio
import os
import signal

import pytest
import torch

from dapo_megatron.rollout.backends import disk_catch_up
from dapo_megatron.rollout.weight_sync import DiskWeightSync
from dapo_megatron.types import Sample
from tests.sglang_real import API_KEY, group_pids, kill_group, needs_server_venv, process_tree_alive, start_servers

pytestmark = [pytest.mark.sglang_cpu, pytest.mark.slow, needs_server_venv]
PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dapo_megatron.models.tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), seed=0)


def test_a_dead_sglang_server_is_restarted_with_the_same_command_caught_up_and_put_back(model_dir, tmp_path):
    """Version 1 synced by disk; the server's whole process group SIGKILLed; the next generate finds it down, waits
    for the supervisor, which starts the same command on the same ports and loads weights_v000001 at version 1;
    the answer is of version 1; the old group is gone."""
    from safetensors.torch import load_file

    servers = start_servers(model_dir, tmp_path / "logs")
    pgids = [servers.processes["sglang-0"][0].pid]
    try:
        client = servers.client(request_timeout_s=300, max_retries=3, backoff_s=0.1)
        sync = DiskWeightSync(client, model_dir, tmp_path / "sync", weight_version=client.version)
        weights = {n: t + 0.01 for n, t in load_file(str(model_dir / "model.safetensors")).items()}
        assert sync.sync(weights.items()) == 1
        sup = servers.supervise(catch_up=disk_catch_up(tmp_path / "sync", API_KEY, 300), health_interval_s=0.5,
                                max_restarts=1)
        client.supervisor = sup
        old = servers.processes["sglang-0"][0]
        command, old_group = list(old.args), group_pids(old.pid)
        os.killpg(old.pid, signal.SIGKILL)
        assert old.wait(timeout=60) == -signal.SIGKILL
        samples = [Sample(prompt_ids=PROMPT, index=i) for i in range(2)]
        asyncio.run(client.generate_group(samples, {"max_new_tokens": 4, "temperature": 1.0}))
        assert all(s.weight_version == 1 and s.response_ids for s in samples)
        new = servers.processes["sglang-0"][0]
        pgids.append(new.pid)
        assert new.pid != old.pid and list(new.args) == command and sup.restarts == 1 and sup.failure is None
        assert not process_tree_alive(old_group)  # the scheduler and detokenizer went with it
        assert asyncio.run(sup.wait_up(sup.urls[0], 60)) is None
    finally:
        servers.shutdown(timeout_s=30)
        for pgid in pgids:
            kill_group(pgid)
