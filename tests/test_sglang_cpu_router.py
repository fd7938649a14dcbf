"""The real sglang-router in front of two real PyPI sglang servers on CPU, each with its KV cache capped, all started
by our launcher (SGLangServers, router=True): what a GPU user's `rollout.sglang_router=true` runs.

Through the router: generation is spread over both workers; a worker SIGKILLed with a request in flight loses nothing
(the request finishes on the other); an abort comes back `finish_reason: abort`; a disk weight sync fans out to the
live worker and the next response reports its version. Needs tools/.venv-sglang (skipped with that message).
Every wait is bounded; every process is stopped by its PID.
"""
import asyncio
import os
import re
import signal
import urllib.request

import pytest

from dapo_megatron.rollout.client import RolloutClient
from dapo_megatron.rollout.weight_sync import DiskWeightSync
from tests.sglang_real import API_KEY, group_pids, kill_group, needs_server_venv, process_tree_alive, start_servers, \
    wait_log

pytestmark = [pytest.mark.sglang_cpu, needs_server_venv]
PROMPT = [5, 6, 7, 8, 9, 10]
LONG = {"max_new_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dapo_megatron.models.tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def routed(model_dir, tmp_path_factory):
    servers = start_servers(model_dir, tmp_path_factory.mktemp("sglang_logs"), num_servers=2, router=True,
                            router_policy="round_robin")
    pgids = [proc.pid for proc, _ in servers.processes.values()]
    yield servers
    servers.shutdown(timeout_s=30)
    for pgid in pgids:
        kill_group(pgid)  # nothing of it may outlive the module, whatever a test did


def prefills(servers, name: str) -> int:
    """Prefill batches one worker has logged so far (sglang 0.5.23 logs one line per prefill batch)."""
    return len(re.findall(r"Prefill batch", servers.processes[name][1].read_text()))


def test_launcher_puts_the_router_in_front_of_both_capped_workers(routed):
    assert routed.client().urls == [routed.router_url] and len(routed.worker_urls) == 2
    for i in range(2):
        cmd = routed.server_command(i)
        assert cmd[cmd.index("--max-total-tokens") + 1] == "4096"
    router_cmd = routed.router_command()
    assert router_cmd[router_cmd.index("--worker-urls") + 1:][:2] == routed.worker_urls
    req = urllib.request.Request(f"{routed.router_url}/health", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def test_round_robin_reaches_both_workers_and_ids_match_logprobs(routed):
    client = routed.client(request_timeout_s=300)
    before = [prefills(routed, f"sglang-{i}") for i in range(2)]

    async def go():
        return await asyncio.wait_for(asyncio.gather(*(client.generate(PROMPT, {"max_new_tokens": 4})
                                                       for _ in range(4))), 300)

    outs = asyncio.run(go())
    for (out,) in outs:
        triples = out["meta_info"]["output_token_logprobs"]
        assert out["output_ids"] == [t for _, t, _ in triples] and len(triples) == 4
    after = [prefills(routed, f"sglang-{i}") for i in range(2)]
    assert all(a > b for a, b in zip(after, before)), (before, after)  # each worker served some


def test_a_worker_killed_mid_request_loses_nothing_and_sync_fans_out(routed, model_dir, tmp_path):
    client = routed.client(request_timeout_s=300, backoff_s=0.2, max_retries=6)

    async def go():
        tasks = [asyncio.create_task(client.generate(PROMPT, LONG)) for _ in range(2)]  # round robin: one each
        await wait_log(routed, "sglang-1", r"Decode batch[^,]*, #running-req: 1,")
        os.killpg(routed.processes["sglang-1"][0].pid, signal.SIGKILL)  # the worker dies mid-request
        return await asyncio.wait_for(asyncio.gather(*tasks), 300)

    pids = group_pids(routed.processes["sglang-1"][0].pid)
    outs = asyncio.run(go())
    assert [len(o[0]["output_ids"]) for o in outs] == [400, 400]
    assert all(o[0]["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert process_tree_alive(pids) == []

    live = RolloutClient([routed.router_url], worker_urls=[routed.worker_urls[0]], api_key=API_KEY,
                         request_timeout_s=300)

    async def abort():
        task = asyncio.create_task(live.generate(PROMPT, {"max_new_tokens": 1000, "ignore_eos": True}))
        await wait_log(routed, "sglang-0", r"Decode batch[^,]*, #running-req: 1,")
        await live.abort_all()
        return await asyncio.wait_for(task, 120)

    assert asyncio.run(abort())[0]["meta_info"]["finish_reason"]["type"] == "abort"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    sync = DiskWeightSync(live, model_dir, tmp_path / "weight_sync")
    assert sync.sync(model.state_dict().items()) == 1  # to the live worker, behind the router
    (out,) = asyncio.run(asyncio.wait_for(live.generate(PROMPT, {"max_new_tokens": 3}), 300))
    assert str(out["meta_info"]["weight_version"]) == "1"
