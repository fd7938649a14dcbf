"""The real sglang-router (prebuilt Rust binary, CPU) in front of two embedded servers, started by SGLangServers.

The client's generate goes through the router; its abort, weight-update and health calls fan out to the workers
behind it (SGLangServers.client()). One worker holds its requests in flight (engine.hold) and is killed mid-request:
the request still completes on the other worker. Needs the tools venv (bash tools/setup_sglang_cpu.sh).
"""
import asyncio
import json
import sys
import urllib.request
from pathlib import Path

import pytest

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import RolloutClient
from dapo_megatron.rollout.sglang_launcher import SGLangServers, free_port_block
from dapo_megatron.rollout.weight_sync import make_weight_sync
from test_rollout_client import HELD_SERVER, _bounded
from test_sglang_cpu import READY, TOOLS_PY
from waiting import async_wait_until

pytestmark = [pytest.mark.sglang_cpu,
              pytest.mark.skipif(not READY, reason="needs the sglang tools venv: bash tools/setup_sglang_cpu.sh")]


def server_info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/get_server_info", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def routed(tmp_path):
    """Worker 0: a plain embedded server; worker 1: one that holds every request; the real router in front."""
    model = make_tiny_hf_model(tmp_path / "m", family="qwen2.5")
    (tmp_path / "logs").mkdir()  # SGLangServers does not create a log_dir it is given
    s = SGLangServers(model, num_servers=2, router=True, base_port=free_port_block(30), router_policy="round_robin",
                      log_dir=tmp_path / "logs", startup_timeout_s=180, python=str(TOOLS_PY))

    def worker_command(i):
        port = str(s.server_port(i))
        if i == 1:
            return [sys.executable, "-c", HELD_SERVER, str(model), port]
        return [sys.executable, "-m", "dapo_megatron.rollout.server", "--model-path", str(model), "--port", port]

    s.server_command = worker_command
    with s:
        yield s, model


def test_router_generate_kill_a_worker_abort_update_and_health(routed, tmp_path):
    servers, model = routed
    live, held = servers.worker_urls
    client = servers.client(backoff_s=0.2, max_retries=4)
    assert client.urls == [servers.router_url] and client.worker_urls == servers.worker_urls
    with urllib.request.urlopen(f"{servers.router_url}/health", timeout=10) as r:
        assert r.status == 200

    async def run():
        assert len(await client.wait_healthy(timeout_s=30)) == 2
        long = {"max_new_tokens": 40, "ignore_eos": True}
        tasks = [asyncio.ensure_future(client.generate([5, 6], long)) for _ in range(2)]  # round robin: one each
        await async_wait_until(lambda: _has_requests(held), f"a request routed to the holding worker {held}")
        servers.processes["sglang-1"][0].kill()  # the worker dies with the request in flight
        return await _bounded(asyncio.gather(*tasks), 120, "both requests to finish (one re-sent to the live worker)")

    outs = asyncio.run(run())
    assert [len(o[0]["output_ids"]) for o in outs] == [40, 40]
    assert all(o[0]["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert server_info(live)["num_requests"] == 0

    # abort: a request the live worker holds comes back through the router with finish_reason abort
    # (the live worker is an embedded server in another process: hold it with a paused engine)
    client = RolloutClient([servers.router_url], worker_urls=[live], backoff_s=0.2)  # control calls: the live one

    async def abort():
        await client.pause_generation(mode="in_place")  # requests wait on the worker, in flight
        task = asyncio.ensure_future(client.generate([5, 6], {"max_new_tokens": 40, "ignore_eos": True}))
        await async_wait_until(lambda: _has_requests(live), "the request to reach the live worker")
        await client.abort_all()
        out = await _bounded(task, 60, "the aborted request to come back through the router")
        await client.continue_generation()
        return out

    assert asyncio.run(abort())[0]["meta_info"]["finish_reason"]["type"] == "abort"

    # weight update: fan out to the worker; the next response through the router reports the new version
    other = make_tiny_hf_model(tmp_path / "other", family="qwen2.5", seed=1)
    sync = make_weight_sync("disk", client, str(model), tmp_path / "sync")
    from transformers import AutoModelForCausalLM

    named = [(n, p.detach()) for n, p in AutoModelForCausalLM.from_pretrained(other).named_parameters()]
    assert sync.sync(named) == 1
    out = asyncio.run(client.generate([5, 6], {"max_new_tokens": 3}))[0]
    assert out["meta_info"]["weight_version"] in (1, "1") and server_info(live)["weight_version"] == 1


async def _has_requests(url: str) -> bool:
    try:
        return (await asyncio.to_thread(server_info, url))["num_requests"] > 0
    except OSError:
        return False
