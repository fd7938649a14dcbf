"""Engines on nodes with no trainer rank, piece by piece: the node host list (SLURM's or $DAPO_NODE_HOSTS) and the
URLs the trainer builds from it, this node's index for `dapo-megatron engines`, the plan's node split the sbatch
reads, the one-line refusals, and the 32B recipe's start-up checks (dry: no GPU). The two-node run itself, a
trainer node and an engines-only node, is tests/test_engine_node_run.py."""
import re
from pathlib import Path

import pytest

from dapo_megatron.config import ConfigError, build_config
from dapo_megatron.placement import PlacementError, expand_nodelist, launch_plan, make_plan, node_engine_hosts, \
    node_hosts, remote_engine_urls
from dapo_megatron.rollout.engine_health import wait_for_engines
from dapo_megatron.rollout.node_engines import engines_here, node_index
from tests.helpers.forked import run_cli

REPO = Path(__file__).resolve().parents[1]
R32 = str(REPO / "examples/dapo_qwen2.5_32b/config.yaml")
TOY = str(REPO / "examples/toy/config.yaml")
DISAGG = ["rollout.colocate=false", "rollout.rollout_nodes=1", "rollout.weight_sync=disk"]


def test_slurm_nodelists_expand_in_order():
    assert expand_nodelist("gpu[01-03,07],cpu-a") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu-a"]
    assert expand_nodelist("rack[1-2]-n[8-9]") == ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]
    assert expand_nodelist("node9") == ["node9"] and expand_nodelist("n[098-101]") == ["n098", "n099", "n100", "n101"]
    assert node_hosts({"DAPO_NODE_HOSTS": "a, b", "SLURM_JOB_NODELIST": "x[1-2]"}) == (["a", "b"], "$DAPO_NODE_HOSTS")
    assert node_hosts({"SLURM_JOB_NODELIST": "x[1-2]"}) == (["x1", "x2"], "$SLURM_JOB_NODELIST")
    assert node_hosts({}) == (None, None)


def test_trainer_builds_engine_only_urls_from_plan_and_host_list():
    plan = make_plan(build_config(R32), 4, 8)
    assert plan.engine_only_nodes() == [2, 3] and node_engine_hosts(plan) == {}
    urls = remote_engine_urls(plan, *node_hosts({"SLURM_JOB_NODELIST": "gpu[10-13]"}))
    assert [(e.index, u) for e, u in urls] == [(0, "http://gpu12:30000"), (1, "http://gpu12:30010"),
                                               (2, "http://gpu13:30000"), (3, "http://gpu13:30010")]
    for hosts, source, message in [(None, None, "set $DAPO_NODE_HOSTS=host0,host1"),
                                   (["a", "b", "c"], "$DAPO_NODE_HOSTS", "$DAPO_NODE_HOSTS names 3 host(s), the plan "
                                                                         "has 4 nodes")]:
        with pytest.raises(PlacementError, match=re.escape(message)) as e:
            remote_engine_urls(plan, hosts, source)
        assert "\n" not in str(e.value)
    # a colocated plan has none to find, host list or not
    assert remote_engine_urls(make_plan(build_config(TOY), 1, 1), None, None) == []


def test_node_index_for_the_engines_command():
    slurm = {"SLURM_JOB_NODELIST": "gpu[10-13]", "SLURMD_NODENAME": "gpu12", "SLURM_NODEID": "0", "NODE_RANK": "9"}
    assert node_index(3, slurm) == (3, "--node-rank")
    assert node_index(None, slurm) == (2, "SLURM's node list")  # the job's order, not the step's SLURM_NODEID
    assert node_index(None, {"NODE_RANK": "1"}) == (1, "$NODE_RANK")
    for env, message in [({}, "pass --node-rank"), ({**slurm, "SLURMD_NODENAME": "cpu1"}, "is not in")]:
        with pytest.raises(PlacementError, match=message):
            node_index(None, env)


def test_engines_here_and_its_refusals():
    plan = make_plan(build_config(R32), 4, 8)
    assert [(e.index, e.gpus[0], e.port) for e in engines_here(plan, 3, "x")] == [(2, 0, 30000), (3, 4, 30010)]
    for node, message in [(4, "node 4 \\(from x\\) is out of range: the plan has nodes 0-3"),
                          (1, "node 1 runs trainer ranks.*only on node\\(s\\) 2, 3")]:
        with pytest.raises(PlacementError, match=message):
            engines_here(plan, node, "x")
    with pytest.raises(PlacementError, match="uses engines at rollout.urls"):
        engines_here(make_plan(build_config(None, ["rollout.backend=http", "rollout.urls=[http://a:1]",
                                                   "rollout.weight_sync=disk"]), 2, 8), 1, "x")


def test_tensor_sync_to_engine_only_nodes_is_refused_and_the_new_keys_are_real_or_refused():
    with pytest.raises(PlacementError, match="weight_sync=tensor .* node\\(s\\) 1 \\(no trainer rank\\).*disk with "
                                             "rollout.weight_sync_dir"):
        make_plan(build_config(None, DISAGG[:2]), 2, 1)
    plan = make_plan(build_config(None, [*DISAGG, "rollout.sglang_base_port=31000"]), 2, 1)
    assert [(e.node, e.port) for e in plan.engines] == [(1, 31000)] and plan.trainer_nodes == [0]
    assert "engine-only node(s) 1: `dapo-megatron engines` starts theirs" in plan.describe()
    with pytest.raises(ConfigError, match="rollout.weight_sync_dir is the folder of disk weight sync"):
        build_config(None, ["rollout.weight_sync_dir=/x"])  # embedded: tensor by default, writes no folder
    with pytest.raises(ConfigError, match="rollout.engine_wait_s=0"):
        build_config(None, ["rollout.engine_wait_s=0"])
    from dapo_megatron.rollout.backends import sync_dir

    named = build_config(None, [*DISAGG, "rollout.weight_sync_dir=/shared/sync"])
    assert sync_dir(named.rollout, named.trainer.run_dir) == Path("/shared/sync")
    default = build_config(None, ["trainer.run_dir=/r"])
    assert sync_dir(default.rollout, default.trainer.run_dir) == Path("/r/weight_sync")


def test_external_distributed_plan_names_its_engine_ranks():
    ext = make_plan(build_config(None, ["rollout.backend=http", "rollout.urls=[http://a:1,http://b:1]",
                                        "rollout.weight_sync=distributed", "rollout.sglang_tp_size=4"]), 1, 8)
    assert "-> 8 engine GPU ranks (2 rollout.urls x rollout.sglang_tp_size=4)" in ext.describe()
    assert "all 0 engine" not in ext.describe()


def test_waiting_for_an_engine_that_never_comes_is_bounded_and_one_line():
    from dapo_megatron.rollout.server import free_port

    plan = make_plan(build_config(None, [*DISAGG, f"rollout.sglang_base_port={free_port()}"]), 2, 1)
    urls = remote_engine_urls(plan, ["127.0.0.1", "127.0.0.1"], "$DAPO_NODE_HOSTS")
    with pytest.raises(ConfigError, match=f"engine 0 at {urls[0][1]} \\(node 1\\) did not answer /health within "
                                          f"0.5 s \\(rollout.engine_wait_s\\)") as e:
        wait_for_engines(urls, "k", 0.5)
    assert "\n" not in str(e.value)


def test_trainer_refuses_engine_only_nodes_without_a_shared_key():
    import torch.distributed as dist

    from dapo_megatron.rollout.node_engines import start_node_engines
    from dapo_megatron.rollout.server import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="must share the run's API key: set \\$DAPO_ROLLOUT_API_KEY"):
            start_node_engines(build_config(None, DISAGG))
        with pytest.raises(ConfigError, match="did not answer /health within 0.2 s"):
            with pytest.MonkeyPatch.context() as m:
                m.setenv("DAPO_NODE_HOSTS", "127.0.0.1,127.0.0.1")
                start_node_engines(build_config(None, [*DISAGG, "rollout.api_key=k", "rollout.engine_wait_s=0.2",
                                                       f"rollout.sglang_base_port={free_port()}"]))
    finally:
        dist.destroy_process_group()


def test_plan_prints_the_node_split_for_the_sbatch():
    assert launch_plan(build_config(R32), 16, 8).engine_only_nodes() == [2, 3]  # 16 trainer ranks + 2 rollout nodes
    rc, out, err = run_cli(["plan", "--config", R32, "--nodes", "4", "--gpus-per-node", "8", "--print",
                            "engine-nodes"], timeout=120)
    assert (rc, out) == (0, "2 3\n"), err
    rc, out, err = run_cli(["plan", "--config", TOY, "--nodes", "1", "--gpus-per-node", "1", "--print",
                            "engine-nodes"], timeout=120)
    assert (rc, out) == (0, "\n"), err


@pytest.mark.parametrize("args, env, message", [
    (["--nodes", "4", "--gpus-per-node", "8", "--node-rank", "2"], {}, "needs the trainer's API key"),
    (["--nodes", "4", "--gpus-per-node", "8", "--node-rank", "0"], {"DAPO_ROLLOUT_API_KEY": "k"},
     "node 0 runs trainer ranks"),
    (["--nodes", "4", "--gpus-per-node", "8", "--node-rank", "7"], {"DAPO_ROLLOUT_API_KEY": "k"}, "out of range"),
    (["--nodes", "2", "--gpus-per-node", "8", "--node-rank", "1"], {"DAPO_ROLLOUT_API_KEY": "k"},
     "leaves no node for the trainer"),
])
def test_engines_command_refuses_in_one_line(args, env, message):
    env = {"DAPO_ROLLOUT_API_KEY": "", "DAPO_ROLLOUT_HOST": "127.0.0.1", **env}
    rc, out, err = run_cli(["engines", "--config", R32, *args], env=env, timeout=120)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (rc, out, err)
    assert message in err and "Traceback" not in err


QWEN25_32B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
              "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
              "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_paper_recipe_passes_its_start_up_checks_dry(monkeypatch, tmp_path):
    """The 32B recipe on 4 x 8 (dry, no GPU): validation (the model's published config.json), the plan, node 2's
    SGLang command lines, and rank 0's client and router over the 4 remote engines, as start_node_engines and the
    sglang backend build them."""
    import json

    from dapo_megatron.config import validate
    from dapo_megatron.rollout import sglang_launcher
    from dapo_megatron.rollout.backends import NodeEngines, SGLangBackend

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_32B))
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    cfg = build_config(R32, [f"model.path={tmp_path}", f"data.path={data}"])
    validate(cfg, 16)
    plan = launch_plan(cfg, 16, 8)
    assert plan.kind == "disaggregated" and plan.sync_mode == "distributed" and node_engine_hosts(plan) == {}
    monkeypatch.setattr(sglang_launcher.SGLangServers, "start", lambda self: self)  # command lines only
    node2 = SGLangBackend.start_engines(cfg, engines_here(plan, 2, "x"), "10.0.0.3", "gpu12", "k")
    cmds = [node2.server_command(i) for i in range(2)]
    assert [c[c.index("--base-gpu-id") + 1] for c in cmds] == ["0", "4"]
    assert [c[c.index("--port") + 1] for c in cmds] == ["30000", "30010"] and node2.urls == [
        "http://gpu12:30000", "http://gpu12:30010"]
    assert all(c[c.index("--tp-size") + 1] == "4" and "--api-key=k" in c for c in cmds)
    urls = [u for _, u in remote_engine_urls(plan, *node_hosts({"SLURM_JOB_NODELIST": "gpu[10-13]"}))]
    routers = []
    monkeypatch.setattr(sglang_launcher.SGLangServers, "start_router", lambda self: routers.append(
        self.router_command()))
    backend = SGLangBackend(cfg.rollout, model_path="m", seed=0, run_dir="r", api_key="k",
                            engines=NodeEngines([], urls, api_key="k"))
    assert backend.client.worker_urls == urls and backend.servers.worker_urls == urls  # control calls reach all
    assert len(routers) == 1 and all(u in routers[0] for u in urls)  # sglang_router: true, on rank 0's node
    assert backend.make_weight_sync() is None  # distributed: every stage's source rank sends its own
    backend.shutdown()


def test_remote_sync_check_digests_catch_one_flipped_bit_and_an_unsent_tensor():
    """DAPO_CHECK_SYNC over HTTP (train/sync_check.py): the sha256 per tensor compared with the engine's digest."""
    import torch

    from dapo_megatron.rollout.weights_digest import compare_digests, tensor_digest, weights_digest

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sent = {n: tensor_digest(p.detach().clone()) for n, p in model.named_parameters()}
    assert compare_digests(sent, weights_digest(model)) == 0
    with torch.no_grad():  # one bit of one weight
        w = model[1].weight.view(-1)[:1].view(torch.int32)
        w ^= 1
    # the tensor, and the engine parameter no matching tensor covers (as the in-process check counts them)
    assert compare_digests(sent, weights_digest(model)) == 2
    with torch.no_grad():
        w ^= 1
    partial = {n: d for n, d in sent.items() if n != "0.bias"}  # never sent: the engine keeps its own
    assert compare_digests(partial, weights_digest(model)) == 1
    zeros = [torch.zeros(2), torch.zeros(1, 2), torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.float64)]
    assert len({tensor_digest(t) for t in zeros}) == 4  # same bytes, another shape or dtype: another tensor


def test_an_engine_that_refuses_the_key_is_named_in_one_line():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dapo_megatron.placement import Engine

    class Handler(BaseHTTPRequestHandler):  # SGLang's --api-key semantics: /health free, the rest needs the key
        def do_GET(self):
            ok = self.path == "/health" or self.headers.get("Authorization") == "Bearer right"
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        wait_for_engines([(Engine(0, 1, [0], 1), url)], "right", 10)
        with pytest.raises(ConfigError, match=f"engine 0 at {url} refuses this run's API key") as e:
            wait_for_engines([(Engine(0, 1, [0], 1), url)], "wrong", 10)
        assert "\n" not in str(e.value)
    finally:
        server.shutdown()
