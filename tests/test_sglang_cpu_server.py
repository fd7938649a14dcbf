"""The real PyPI sglang server on CPU, started by our launcher, driven by our client and our disk weight sync.

One server for the whole module (~40 s to start on 2 cores). Needs tools/.venv-sglang (bash tools/setup_sglang_cpu.sh,
run by .ci/run); skipped with that message otherwise. Every wait is bounded; the server's process group is stopped
by its PID (the last test checks that it is).
"""
import asyncio
import json
import urllib.error
import urllib.request

import pytest
import torch

from dapo_megatron.rollout.client import RolloutClient, run_sync
from dapo_megatron.rollout.sglang_launcher import CPU_FLAGS
from dapo_megatron.rollout.weight_sync import DiskWeightSync
from dapo_megatron.types import Sample
from tests.sglang_real import API_KEY, TOOLS_PY, group_pids, kill_group, needs_server_venv, process_tree_alive, \
    start_servers, wait_log

pytestmark = [pytest.mark.sglang_cpu, needs_server_venv]
PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dapo_megatron.models.tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    servers = start_servers(model_dir, tmp_path_factory.mktemp("sglang_logs"))
    pgid = servers.processes["sglang-0"][0].pid
    yield servers
    servers.shutdown(timeout_s=30)
    kill_group(pgid)  # nothing of it may outlive the module, whatever a test did


class RecordingClient(RolloutClient):
    """Our client, keeping every /generate body exactly as SGLang sent it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bodies = []

    async def _call(self, url, path, payload=None, **kwargs):
        status, body = await super()._call(url, path, payload, **kwargs)
        if path == "/generate":
            self.bodies.append(body)
        return status, body


def client_of(servers, **kwargs):
    return RecordingClient(servers.generate_urls, worker_urls=servers.worker_urls, api_key=API_KEY,
                           request_timeout_s=300, **kwargs)


def http(url, path, payload=None, key=API_KEY, timeout=60):
    req = urllib.request.Request(url + path, data=None if payload is None else json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------------------------------------------- launcher
def test_launcher_command_line_env_health_and_log(servers, model_dir):
    port = servers.server_port(0)
    assert servers.server_command(0) == [
        str(TOOLS_PY), "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
        "--port", str(port), "--nccl-port", str(port + 1), "--tp-size", "1", "--base-gpu-id", "0",
        "--mem-fraction-static", "0.1", "--random-seed", "0", "--trust-remote-code", "--dtype", "float32",
        f"--api-key={API_KEY}",
        *CPU_FLAGS, "--max-total-tokens", "4096"]  # extra_args named it: no default cap added
    assert servers.server_env()["SGLANG_USE_CPU_ENGINE"] == "1"
    proc, log_path = servers.processes["sglang-0"]
    assert proc.poll() is None and list(proc.args) == servers.server_command(0)
    # start() returned only once /health answered: it still does, and the server's own log went to our file
    assert http(servers.local_urls[0], "/health")[0] == 200
    text = log_path.read_text()
    assert "Uvicorn running on" in text and f":{port}" in text


def test_api_key_is_required(servers):
    url = servers.local_urls[0]
    for path in ("/model_info", "/get_server_info"):
        assert http(url, path, key=None)[0] == 401
        assert http(url, path, key="wrong")[0] == 401
    status, info = http(url, "/model_info")
    assert status == 200 and info["model_path"] == servers.model_path


# ---------------------------------------------------------------------------------------------------- client
def test_n_samples_carry_exactly_the_ids_and_logprobs_sglang_sent(servers):
    client = client_of(servers)
    samples = [Sample(prompt_ids=PROMPT, group_id=3, index=i) for i in range(4)]
    run_sync(client.generate_group(samples, {"max_new_tokens": 6, "temperature": 1.0}))
    (body,) = client.bodies
    assert isinstance(body, list) and len(body) == 4  # one request, n=4
    for s, out in zip(samples, body):
        triples = out["meta_info"]["output_token_logprobs"]
        assert s.response_ids == out["output_ids"] == [t for _, t, _ in triples]
        assert s.rollout_logprobs == [lp for lp, _, _ in triples]  # bit-equal floats, nothing recomputed
        assert all(lp <= 0 for lp in s.rollout_logprobs) and s.prompt_ids == PROMPT
        assert s.finish_reason == "length" and len(s.response_ids) == 6
    assert len({tuple(s.response_ids) for s in samples}) > 1  # sampled, not one answer copied n times


def test_finish_reasons_stop_and_length_with_stop_token_ids(servers):
    client = client_of(servers)
    greedy = {"max_new_tokens": 5, "temperature": 0.0}
    (first,) = run_sync(client.generate(PROMPT, greedy))
    assert first["meta_info"]["finish_reason"]["type"] == "length" and len(first["output_ids"]) == 5
    stop_at = first["output_ids"][2]
    s = Sample(prompt_ids=PROMPT)
    run_sync(client.generate_group([s], {**greedy, "stop_token_ids": [stop_at]}))
    k = first["output_ids"].index(stop_at)
    assert s.finish_reason == "stop" and s.response_ids == first["output_ids"][:k + 1]  # the stop token is kept
    assert s.rollout_logprobs == pytest.approx([lp for lp, _, _ in first["meta_info"]["output_token_logprobs"]][:k + 1],
                                               abs=1e-5)


def test_abort_all_returns_finish_reason_abort(servers):
    client = client_of(servers)

    async def go():
        s = Sample(prompt_ids=PROMPT)
        task = asyncio.create_task(client.generate_group([s], {"max_new_tokens": 1000, "ignore_eos": True}))
        await wait_running(servers, 1)
        await client.abort_all()
        await asyncio.wait_for(task, 60)
        return s
    s = run_sync(go())
    assert s.finish_reason == "abort" and len(s.response_ids) < 1000
    assert len(s.response_ids) == len(s.rollout_logprobs)


async def wait_running(servers, n: int, timeout_s: float = 90.0):
    """Until the server logs a decode batch of `n` running requests after this call, bounded."""
    await wait_log(servers, "sglang-0", rf"Decode batch[^,]*, #running-req: {n},", timeout_s)


# ---------------------------------------------------------------------------------------------------- weight sync
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def trainer_logprobs(model, prompt, response) -> list:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0].tolist()


def test_disk_weight_sync_serves_the_trainers_weights_and_version(servers, model_dir, tmp_path):
    """After each sync, SGLang's log-probs of sampled tokens equal the trainer's (float32 on both sides)."""
    model = hf_model(model_dir)
    client = client_of(servers)
    sync = DiskWeightSync(client, model_dir, tmp_path / "weight_sync")
    gaps = []
    torch.manual_seed(0)
    for step in (1, 2):
        with torch.no_grad():  # one "optimizer step": every weight moves, far more than the tolerance
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        assert sync.sync(model.state_dict().items()) == step
        samples = [Sample(prompt_ids=PROMPT, index=i) for i in range(4)]
        run_sync(client.generate_group(samples, {"max_new_tokens": 8, "temperature": 1.0}))
        for s in samples:
            assert s.weight_version == step
            ref = trainer_logprobs(model, s.prompt_ids, s.response_ids)
            gaps.append(max(abs(a - b) for a, b in zip(ref, s.rollout_logprobs)))
        out = client.bodies[-1][0]["meta_info"]
        assert out["weight_version"] == str(step)
    print(f"max |trainer - sglang| log-prob over {len(gaps)} samples: {max(gaps):.2e}")
    assert max(gaps) < 1e-5  # float32 both sides: 9.5e-7 measured (sglang's "auto" serves float16: 1.6e-3)
    before = trainer_logprobs(hf_model(model_dir), samples[0].prompt_ids, samples[0].response_ids)
    assert max(abs(a - b) for a, b in zip(before, samples[0].rollout_logprobs)) > 1e-2  # the check can fail


def test_distributed_weight_sync_over_gloo(servers, model_dir):
    """/init_weights_update_group + /update_weights_from_distributed (inside /begin_weight_update ... /end) with a
    gloo group: sglang 0.5.23 accepts it on CPU; the served log-probs are then the trainer's."""
    import socket

    from dapo_megatron.rollout.weight_sync import make_weight_sync

    model = hf_model(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = client_of(servers)
    sync = make_weight_sync("distributed", client, master_address="127.0.0.1", master_port=port, backend="gloo",
                            device="cpu", weight_version=200)
    try:
        assert sync.sync(model.state_dict().items()) == 201
        samples = [Sample(prompt_ids=PROMPT, index=i) for i in range(2)]
        run_sync(client.generate_group(samples, {"max_new_tokens": 6, "temperature": 1.0}))
    finally:
        sync.close()  # /destroy_weights_update_group
    for s in samples:
        assert s.weight_version == 201
        ref = trainer_logprobs(model, s.prompt_ids, s.response_ids)
        assert max(abs(a - b) for a, b in zip(ref, s.rollout_logprobs)) < 1e-5


# ---------------------------------------------------------------------------------------------------- pause
@pytest.mark.parametrize("mode", ["retract", "abort"])
def test_pause_update_continue_with_requests_in_flight(servers, model_dir, tmp_path, mode):
    """rollout.async_steps=1's contract: pause, swap weights, continue; nothing is lost or hangs. retract: the
    requests finish after continue, the tokens after the swap under the new version; abort: they come back
    finish_reason=abort with what they had."""
    client = client_of(servers)
    new_weights = tmp_path / "v_new"
    model = hf_model(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(new_weights)
    version = {"retract": 101, "abort": 102}[mode]

    async def go():
        samples = [Sample(prompt_ids=PROMPT, group_id=g) for g in range(2)]
        tasks = [asyncio.create_task(client.generate_group([s], {"max_new_tokens": 160, "ignore_eos": True}))
                 for s in samples]
        await wait_running(servers, 2)
        await client.pause_generation(mode)
        await client.update_weights_from_disk(str(new_weights), weight_version=version)
        await client.continue_generation()
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return samples
    samples = run_sync(go())
    for s, body in zip(samples, client.bodies):
        meta = (body[0] if isinstance(body, list) else body)["meta_info"]  # n=1: one dict
        assert len(s.response_ids) == len(s.rollout_logprobs)
        if mode == "abort":
            assert s.finish_reason == "abort" and len(s.response_ids) < 160
        else:
            assert s.finish_reason == "length" and len(s.response_ids) == 160
            assert meta["weight_version"] == str(version)  # SGLang's: the version that finished it
            assert s.weight_versions[-1] == version and s.weight_version == min(s.weight_versions)  # ours: the oldest
            spans = meta["weight_versions"]  # [{version, start, end}]: which tokens each version made
            assert spans[-1]["version"] == str(version) and spans[-1]["end"] == 160
            assert spans[0]["version"] != str(version) and spans[0]["start"] == 0
    assert http(servers.local_urls[0], "/health_generate", timeout=120)[0] == 200  # still serves


# ---------------------------------------------------------------------------------------------------- shutdown
def test_shutdown_stops_the_server_and_its_children(servers):
    proc = servers.processes["sglang-0"][0]
    pids = group_pids(proc.pid)
    assert len(pids) >= 3, pids  # server + scheduler + detokenizer
    servers.shutdown(timeout_s=60)
    assert proc.returncode is not None and servers.processes == {}
    assert process_tree_alive(pids) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{servers.local_urls[0]}/health", timeout=5)
