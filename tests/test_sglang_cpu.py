"""Real SGLang, checked on CPU: the pinned sglang's own parser accepts every launcher command line, and the client's
request fields exist in sglang's own request dataclasses.

Needs the tools venv (`bash tools/setup_sglang_cpu.sh`, run by .ci/run); skipped with that message otherwise.
`GenerateReqInput` does not import on CPU (sglang.srt.managers.io_struct pulls torchvision and the model configs), so
its fields are read from the installed sglang source with `ast` instead of being imported.
"""
import ast
import json
import re
import subprocess
from pathlib import Path

import pytest

from dapo_megatron.config import build_config
from dapo_megatron.rollout.sglang_launcher import servers_for

REPO = Path(__file__).resolve().parents[1]
TOOLS_PY = REPO / "tools" / ".venv-sglang" / "bin" / "python"
READY = any((REPO / "tools" / ".venv-sglang").glob(".ready-sglang-*"))  # written last by setup_sglang_cpu.sh
RECIPES = sorted(REPO.glob("examples/*/config.yaml"))

pytestmark = [pytest.mark.sglang_cpu,
              pytest.mark.skipif(not READY, reason="needs the sglang tools venv: bash "
                                 "tools/setup_sglang_cpu.sh")]


def pinned(name: str) -> str:
    return re.search(rf'"{name}==([^"]+)"', (REPO / "setup.py").read_text()).group(1)


def parse(commands: list) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLS_PY), str(REPO / "tools" / "sglang_parse_check.py")], input=json.dumps(commands),
                          capture_output=True, text=True, timeout=600)


def recipe_servers(path, tmp_path, **kwargs):
    cfg = build_config(str(path))
    return servers_for(cfg.model.path, cfg.rollout, log_dir=tmp_path, python="python", **kwargs)


def all_commands(tmp_path) -> list:
    """Every command SGLangServers builds for each shipped recipe, plus the variants a run can switch on."""
    out = []
    for path in RECIPES:
        for kwargs in ({}, {"dtype": "bfloat16", "router": True}, {"enable_memory_saver": False},
                       {"enable_return_routed_experts": True},  # actor.routing_replay=r3
                       {"device": "cpu"}):  # a machine without CUDA (the real server on CPU: test_sglang_cpu_server)
            kwargs = {"device": "cuda", **kwargs}  # the recipes' GPU command lines, whatever this machine has
            s = recipe_servers(path, tmp_path, **kwargs)
            out += [(path.parent.name, s, s.server_command(i)) for i in range(s.num_servers)]
            if s.router:
                out.append((path.parent.name, s, s.router_command()))
    return out


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    commands = all_commands(tmp_path_factory.mktemp("sglang_logs"))
    proc = parse([cmd for _, _, cmd in commands])
    assert proc.returncode == 0, f"the pinned sglang rejected a launcher command:\n{proc.stderr[-3000:]}"
    return commands, json.loads(proc.stdout.splitlines()[-1])


def test_pinned_versions_are_the_ones_tested(parsed):
    _, result = parsed
    script = (REPO / "tools" / "setup_sglang_cpu.sh").read_text()
    assert result["sglang"] == pinned("sglang") and f"SGLANG_VERSION={result['sglang']}" in script
    assert result["sglang_router"] == pinned("sglang-router")


def test_every_recipe_command_parses_to_what_the_launcher_meant(parsed):
    commands, result = parsed
    assert len(commands) == len(result["parsed"]) and {name for name, _, _ in commands} == {p.parent.name
                                                                                         for p in RECIPES}
    servers = routers = 0
    for (name, s, cmd), got in zip(commands, result["parsed"]):
        args = got["args"]
        if got["module"] == "sglang.launch_server":
            i = [s.server_command(k) for k in range(s.num_servers)].index(cmd)
            assert args["model_path"] == s.model_path and args["port"] == s.server_port(i), name
            assert args["tp_size"] == s.tp_size and args["base_gpu_id"] == s.base_gpu_id + i * s.tp_size, name
            assert args["mem_fraction_static"] == pytest.approx(s.mem_fraction_static), name
            assert args["nccl_port"] == s.server_port(i) + 1 and args["random_seed"] == s.seed + i, name
            assert args["enable_memory_saver"] is s.enable_memory_saver, name
            assert args["enable_return_routed_experts"] is s.enable_return_routed_experts, name
            cpu_dtype = "float32" if s.device == "cpu" else "auto"
            assert args["dtype"] == (s.dtype or cpu_dtype) and args["trust_remote_code"] is True, name
            assert (args["device"] == "cpu") is (s.device == "cpu"), name
            servers += 1
        else:
            assert args["worker_urls"] == s.worker_urls and args["port"] == s.router_port, name
            assert args["policy"] == s.router_policy and args["host"] == s.host, name
            routers += 1
    assert servers > 20 and routers >= len(RECIPES)


def test_a_renamed_flag_is_rejected_by_the_real_parser(tmp_path):
    cmd = recipe_servers(RECIPES[0], tmp_path).server_command(0)
    cmd[cmd.index("--tp-size")] = "--tensor-parallel-sizee"
    proc = parse([cmd])
    assert proc.returncode != 0 and "--tensor-parallel-sizee" in proc.stderr


def _dataclass_fields(source: Path, name: str) -> set:
    """Annotated fields of class `name` and of its base classes defined in the same file."""
    classes = {n.name: n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ClassDef)}
    cls = classes[name]
    own = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    bases = [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in classes]
    return own.union(*(_dataclass_fields(source, b) for b in bases))


def _sglang_source(rel: str) -> Path:
    found = sorted((REPO / "tools" / ".venv-sglang" / "lib").glob(f"python*/site-packages/sglang/{rel}"))
    assert found, f"sglang/{rel} not found in the tools venv"
    return found[0]


def test_client_request_fields_exist_in_sglang_request_dataclasses():
    io_struct = _sglang_source("srt/managers/io_struct.py")
    generate = _dataclass_fields(io_struct, "GenerateReqInput")
    # what RolloutClient.generate sends, and the sampling params the rollout stage passes
    assert {"input_ids", "sampling_params", "rid", "return_logprob", "return_text_in_logprobs", "text",
            "stream", "return_routed_experts"} <= generate
    assert {"model_path", "weight_version", "abort_all_requests"} <= _dataclass_fields(
        io_struct, "UpdateWeightFromDiskReqInput")
    assert {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"} <= \
        _dataclass_fields(io_struct, "InitWeightsUpdateGroupReqInput")
    assert {"names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version"} <= _dataclass_fields(
        io_struct, "UpdateWeightsFromDistributedReqInput")
    assert {"rid", "abort_all"} <= _dataclass_fields(io_struct, "AbortReq")
    sampling = _dataclass_fields(_sglang_source("srt/sampling/sampling_params.py"), "SamplingParams") or \
        set(re.findall(r"self\.(\w+) = ", _sglang_source("srt/sampling/sampling_params.py").read_text()))
    assert {"max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "ignore_eos",
            "skip_special_tokens", "no_stop_trim", "sampling_seed"} <= sampling


def test_an_api_key_that_starts_with_a_dash_reaches_server_and_router(tmp_path):
    """CI lost a run to a generated key starting with '-': `--api-key -x...` made argparse read the key as a flag."""
    s = recipe_servers(RECIPES[0], tmp_path, router=True, api_key="-dash-key")
    proc = parse([s.server_command(0), s.router_command()])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p["args"]["api_key"] for p in json.loads(proc.stdout.splitlines()[-1])["parsed"]] == ["-dash-key"] * 2
