"""Embedded HTTP server: SGLang field names and shapes, 400 on bad requests while serving on; launcher commands."""
import json
import sys
import urllib.error
import urllib.request

import pytest

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.server import launch_embedded_server, parse_args
from dapo_megatron.rollout.sglang_launcher import SGLangServers, free_port_block


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_hf_model(tmp_path_factory.mktemp("server_model") / "m", family="qwen2.5")
    with launch_embedded_server(path, 0, max_batch_size=8) as srv:
        yield srv


def call(server, path, body=None, *, raw: bytes = None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_generate_single_prompt_is_a_dict_with_sglang_fields(server):
    status, out = call(server, "/generate", {"input_ids": [5, 6, 7], "return_logprob": True, "rid": "r1",
                                             "sampling_params": {"max_new_tokens": 4, "temperature": 0.5,
                                                                 "ignore_eos": True}})
    assert status == 200 and isinstance(out, dict)
    meta = out["meta_info"]
    assert meta["id"] == "r1" and meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["weight_version"] == 0
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(lp < 0 and text is None for lp, _, text in meta["output_token_logprobs"])


def test_generate_n_and_batch_return_lists(server):
    status, out = call(server, "/generate", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2,
                                                                                          "n": 3}})
    assert status == 200 and len(out) == 3 and "output_token_logprobs" not in out[0]["meta_info"]
    status, out = call(server, "/generate", {"input_ids": [[5, 6], [7]], "sampling_params": {"max_new_tokens": 2,
                                                                                            "n": 2}})
    assert status == 200 and len(out) == 4 and [o["meta_info"]["prompt_tokens"] for o in out] == [2, 2, 1, 1]
    status, out = call(server, "/generate", {"text": "2+2=", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and out["meta_info"]["prompt_tokens"] == 4


@pytest.mark.parametrize("body, message", [
    ({}, "text or input_ids"),
    ({"input_ids": [5, 500]}, "not a token id"),
    ({"input_ids": []}, "non-empty"),
    ({"input_ids": "abc"}, "token ids"),
    ({"input_ids": [5], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"input_ids": [5], "sampling_params": {"top_p": 1.5}}, "top_p"),
    ({"input_ids": [5], "sampling_params": {"frequency_penalty": 0.5}}, "not supported"),
    ({"input_ids": [5], "sampling_params": {"max_tokens": 5}}, "unknown sampling_params field"),
    ({"input_ids": [5], "stream": True}, "stream"),
    ({"input_ids": [[5], [6]], "sampling_params": [{}]}, "1 entries for a batch of 2"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, message):
    status, out = call(server, "/generate", body)
    assert status == 400 and message in out["message"]
    assert call(server, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})[0] == 200


def test_bad_json_and_unknown_endpoint(server):
    status, out = call(server, "/generate", raw=b"{not json")
    assert status == 400 and "not valid JSON" in out["message"]
    assert call(server, "/no_such_endpoint")[0] == 404
    assert call(server, "/health")[0] == 200


def test_control_endpoints(server):
    assert call(server, "/health_generate")[0] == 200
    status, info = call(server, "/get_model_info")
    assert status == 200 and info["is_generation"] and info["weight_version"] == 0 and info["vocab_size"] == 128
    assert call(server, "/flush_cache", {}) == (200, "Cache flushed.\n")
    assert call(server, "/abort_request", {"rid": "nothing-running"})[0] == 200
    assert call(server, "/abort_request", {})[0] == 400
    assert call(server, "/pause_generation", {"mode": "in_place"})[1]["status"] == "ok"
    assert call(server, "/health_generate")[0] == 200  # paused but alive
    assert call(server, "/continue_generation", {})[0] == 200
    assert call(server, "/pause_generation", {"mode": "nope"})[0] == 400
    assert call(server, "/continue_generation", {})[0] == 200
    assert call(server, "/release_memory_occupation", {})[0] == 200
    assert call(server, "/resume_memory_occupation", {})[0] == 200


def test_tensor_and_nccl_updates_are_refused_over_http_with_the_alternative(server):
    status, out = call(server, "/update_weights_from_tensor", {"serialized_named_tensors": []})
    assert status == 400 and "RolloutClient(engine=...)" in out["message"]
    status, out = call(server, "/init_weights_update_group", {"master_address": "x", "master_port": 1,
                                                              "rank_offset": 1, "world_size": 2})
    assert status == 400 and "real SGLang" in out["message"]
    status, out = call(server, "/update_weights_from_disk", {"model_path": "/nonexistent"})
    assert status == 400 and out["success"] is False


def test_cli_arguments():
    args = parse_args(["--model-path", "m", "--port", "31000", "--dtype", "bfloat16", "--max-batch-size", "4"])
    assert (args.model_path, args.port, args.host, args.dtype, args.max_batch_size) == ("m", 31000, "127.0.0.1",
                                                                                         "bfloat16", 4)


# --------------------------------------------------------------------------- real SGLang launcher (CPU: commands)
def test_sglang_server_and_router_commands(tmp_path):
    """The GPU command lines (device=cuda named: on a machine without CUDA the launcher adds the CPU flags)."""
    s = SGLangServers("/models/qwen", num_servers=2, tp_size=4, mem_fraction_static=0.7, base_port=30000,
                      enable_memory_saver=True, router=True, log_dir=tmp_path, dtype="bfloat16", device="cuda")
    cmd = s.server_command(1)
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    flags = {a: b for a, b in zip(cmd[3:], cmd[4:] + [""]) if a.startswith("--") and not b.startswith("--")}
    assert flags["--model-path"] == "/models/qwen" and flags["--port"] == "30010" and flags["--tp-size"] == "4"
    assert flags["--base-gpu-id"] == "4" and flags["--mem-fraction-static"] == "0.7"
    assert flags["--nccl-port"] == "30011" and flags["--dtype"] == "bfloat16"
    assert "--enable-memory-saver" in cmd
    assert s.worker_urls == ["http://127.0.0.1:30000", "http://127.0.0.1:30010"]
    assert s.router_command()[3:] == ["--worker-urls", "http://127.0.0.1:30000", "http://127.0.0.1:30010",
                                      "--host", "127.0.0.1", "--port", "29999", "--policy", "cache_aware"]
    assert s.generate_urls == ["http://127.0.0.1:29999"]
    client = s.client(max_concurrency=8)
    assert client.urls == ["http://127.0.0.1:29999"] and client.worker_urls == s.worker_urls
    plain = SGLangServers("/m", enable_memory_saver=False, device="cuda")
    assert "--enable-memory-saver" not in plain.server_command(0) and plain.generate_urls == plain.worker_urls
    with pytest.raises(RuntimeError, match="enable_memory_saver"):
        with plain.memory_released():
            pass


def test_sglang_launch_failure_shows_the_log_tail(tmp_path):
    # A "server" that dies at once stands in for sglang failing to start (sglang is not installed on CPU).
    s = SGLangServers("/m", log_dir=tmp_path, startup_timeout_s=20, python=sys.executable,
                      base_port=free_port_block())  # not 30000: a port someone else may hold
    s.server_command = lambda i: [sys.executable, "-c", "import sys; print('CUDA error: no GPU'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="(?s)sglang-0.*exited with code 3.*CUDA error: no GPU"):
        s.start()
    assert s.processes == {}


def test_malformed_bodies_get_400_not_500(server):
    surrogate = b'{"text": "2+2=\\ud800", "sampling_params": {"max_new_tokens": 1}}'  # legal JSON, not UTF-8 text
    status, out = call(server, "/generate", raw=surrogate)
    assert status == 400 and "lone UTF-16 surrogate" in out["message"]
    deep = b"[" * 100_000 + b"]" * 100_000
    status, out = call(server, "/generate", raw=deep)
    assert status == 400 and "not valid JSON" in out["message"]
    nested = b'{"input_ids": [5], "rid": ' + b"[" * 70 + b"]" * 70 + b"}"  # parses, deeper than any API body
    status, out = call(server, "/generate", raw=nested)
    assert status == 400 and "nests deeper than 64" in out["message"]
    assert call(server, "/generate", raw=b"\xff\xfe{}")[0] == 400  # not UTF-8
    status, out = call(server, "/generate", {"input_ids": [5], "sampling_params": {"n": 10000}})
    assert status == 400 and "n=10000 exceeds this server's cap of 1024" in out["message"]
    assert call(server, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})[0] == 200


def test_caps_on_n_and_body_size_are_configurable(tmp_path):
    path = make_tiny_hf_model(tmp_path / "m", family="qwen2.5")
    with launch_embedded_server(path, 0, max_batch_size=8, max_n=2, max_body_bytes=4096) as srv:
        ok = {"input_ids": [5], "sampling_params": {"max_new_tokens": 1, "n": 2}}
        status, out = call(srv, "/generate", ok)
        assert status == 200 and len(out) == 2
        status, out = call(srv, "/generate", {**ok, "sampling_params": [{"n": 3}]})
        assert status == 400 and "cap of 2 (--max-n)" in out["message"]
        status, out = call(srv, "/generate", {"input_ids": [5] * 3000})  # ~9 kB body
        assert status == 413 and "exceeds 4096 bytes" in out["message"]
        assert call(srv, "/generate", ok)[0] == 200  # still serving
    args = parse_args(["--model-path", "m", "--max-n", "8", "--max-body-bytes", "1000"])
    assert (args.max_n, args.max_body_bytes) == (8, 1000)
