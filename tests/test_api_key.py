"""Nobody else drives the engines: API key (SGLang's --api-key semantics), disk updates only under the sync folder,
the key never in config.json, a fresh key per run when none is configured."""
import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dapo_megatron.config import build_config
from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import RolloutClient, RolloutRequestError
from dapo_megatron.rollout.server import launch_embedded_server
from dapo_megatron.rollout.sglang_launcher import SGLangServers
from dapo_megatron.rollout.backends import run_api_key
from dapo_megatron.types import Sample

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("apikey")
    path = make_tiny_hf_model(root / "m", family="qwen2.5")
    sync_root = root / "run" / "weight_sync"
    (sync_root / "weights_v000001").mkdir(parents=True)
    with launch_embedded_server(path, 0, max_batch_size=4, api_key=KEY, weights_root=sync_root) as srv:
        yield srv, path, sync_root


def call(url, path, body=None, key=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    return status, json.loads(text) if text else None


def test_embedded_server_answers_401_without_the_key(served):
    srv, _, _ = served
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
    assert call(srv.url, "/generate", body)[0] == 401
    assert call(srv.url, "/generate", body, key="wrong")[0] == 401
    assert call(srv.url, "/pause_generation", {"mode": "abort"})[0] == 401
    assert call(srv.url, "/update_weights_from_disk", {"model_path": "/etc"})[0] == 401
    assert call(srv.url, "/health")[0] == 200  # liveness stays open, as in SGLang
    status, out = call(srv.url, "/generate", body, key=KEY)
    assert status == 200 and out["meta_info"]["completion_tokens"] == 2


def test_client_sends_the_key(served):
    srv, _, _ = served
    group = [Sample(prompt_ids=[5, 6], index=i) for i in range(2)]
    params = {"max_new_tokens": 2}
    with pytest.raises(RolloutRequestError, match="HTTP 401"):
        asyncio.run(RolloutClient([srv.url], max_retries=0).generate_group(group, params))
    out = asyncio.run(RolloutClient([srv.url], api_key=KEY).generate_group(group, params))
    assert all(len(s.response_ids) == 2 for s in out)


def test_disk_updates_read_only_under_the_sync_folder(served, tmp_path):
    srv, model, sync_root = served
    status, out = call(srv.url, "/update_weights_from_disk", {"model_path": str(model)}, key=KEY)
    assert status == 403 and str(sync_root) in out["message"]
    escape = str(sync_root / ".." / ".." / "m")  # resolves outside the sync folder
    assert call(srv.url, "/update_weights_from_disk", {"model_path": escape}, key=KEY)[0] == 403
    # under the root the request reaches the engine (which then checks the folder itself: 400, not 403)
    assert call(srv.url, "/update_weights_from_disk", {"model_path": str(sync_root / "weights_v000001")},
                key=KEY)[0] == 400


def test_key_never_in_config_json_and_fresh_per_run(monkeypatch):
    cfg = build_config(None, [f"rollout.api_key={KEY}"])
    assert KEY not in json.dumps(cfg.to_dict(), default=str) and run_api_key(cfg) == KEY
    monkeypatch.delenv("DAPO_ROLLOUT_API_KEY", raising=False)
    plain = build_config(None, [])
    a, b = run_api_key(plain), run_api_key(plain)
    assert a != b and len(a) >= 32  # generated per run when unset
    monkeypatch.setenv("DAPO_ROLLOUT_API_KEY", "from-env")
    assert run_api_key(plain) == "from-env"


def test_the_key_is_produced_in_one_place():
    """start_node_engines produces the run's key on rank 0 (RolloutStage and `eval` take it from there): no other
    module calls run_api_key."""
    pkg = Path(run_api_key.__code__.co_filename).parents[1]
    calls = sorted(f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py")
                   for i, line in enumerate(p.read_text().splitlines(), 1)
                   if "run_api_key(" in line and "def run_api_key(" not in line and "import" not in line)
    assert len(calls) == 1 and calls[0].startswith("rollout/node_engines.py:"), calls


def test_sglang_servers_and_router_get_the_key():
    servers = SGLangServers("/m", num_servers=1, router=True, api_key=KEY)
    cmd = servers.server_command(0)  # on a machine without CUDA the CPU flags follow the key
    assert f"--api-key={KEY}" in cmd and servers.router_command()[-1] == f"--api-key={KEY}"
    assert servers.client().__dict__["_headers"] == {"Authorization": f"Bearer {KEY}"}
