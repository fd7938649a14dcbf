"""rollout.sglang_python and rollout.sglang_extra_args, and the launcher's CPU command line: what each changes in the
command that starts SGLang, and what validation refuses. Needs no sglang (the real server runs them in
tests/test_sglang_cpu_server.py and tests/test_sglang_cpu_train.py)."""
import os
import sys

import pytest

from dapo_megatron.config import ConfigError, build_config
from dapo_megatron.rollout.sglang_launcher import CPU_FLAGS, CPU_MAX_TOTAL_TOKENS, cpu_threads_bind, servers_for

TOY = "examples/toy/config.yaml"


def rollout(*overrides):
    return build_config(TOY, ["rollout.backend=sglang", *overrides]).rollout


def test_python_and_extra_args_reach_the_command_line(tmp_path):
    r = rollout(f"rollout.sglang_python={sys.executable}", "rollout.sglang_extra_args=[--max-total-tokens, 512, "
                "--schedule-policy, lpm]")
    assert r.sglang_extra_args == ["--max-total-tokens", "512", "--schedule-policy", "lpm"]
    cmd = servers_for("m", r, log_dir=tmp_path, device="cpu").server_command(0)
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert cmd[-4:] == ["--max-total-tokens", "512", "--schedule-policy", "lpm"]
    assert str(CPU_MAX_TOTAL_TOKENS) not in cmd  # the user's cap replaces the default one
    default = servers_for("m", rollout(), log_dir=tmp_path, device="cpu")
    assert default.python == sys.executable  # the trainer's interpreter
    assert default.server_command(0)[-2:] == ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]


def test_cpu_and_gpu_command_lines(tmp_path):
    cpu = servers_for("m", rollout(), log_dir=tmp_path, device="cpu")  # colocate=true: no memory saver on CPU
    cmd = cpu.server_command(0)
    assert not cpu.enable_memory_saver and "--enable-memory-saver" not in cmd
    i = cmd.index(CPU_FLAGS[0])
    assert tuple(cmd[i:i + len(CPU_FLAGS)]) == CPU_FLAGS and cmd[cmd.index("--dtype") + 1] == "float32"
    assert cpu.server_env()["SGLANG_USE_CPU_ENGINE"] == "1"
    gpu = servers_for("m", rollout(), log_dir=tmp_path, device="cuda")
    cmd = gpu.server_command(0)
    assert gpu.enable_memory_saver and "--enable-memory-saver" in cmd
    assert "--device" not in cmd and "--dtype" not in cmd and "--max-total-tokens" not in cmd
    assert gpu.server_env() == dict(os.environ)
    own_dtype = servers_for("m", rollout("rollout.sglang_extra_args=[--dtype, bfloat16]"), log_dir=tmp_path,
                            device="cpu").server_command(0)
    assert own_dtype.count("--dtype") == 1 and own_dtype[-2:] == ["--dtype", "bfloat16"]


@pytest.mark.parametrize("overrides, words", [
    (["rollout.sglang_python=/no/such/python"], "rollout.sglang_python=/no/such/python is not an executable"),
    (["rollout.sglang_extra_args=[--port, 5]"], "rollout.sglang_extra_args sets --port"),
    (["rollout.sglang_extra_args=[--tp-size=2]"], "rollout.sglang_extra_args sets --tp-size=2"),
    (["rollout.sglang_extra_args=--max-total-tokens"], "use a list of flags"),
    (["rollout.backend=embedded", f"rollout.sglang_python={sys.executable}"], "rollout.backend=embedded starts none"),
    (["rollout.backend=embedded", "rollout.sglang_extra_args=[--x]"], "rollout.sglang_extra_args sets how"),
])
def test_refused_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        rollout(*overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, planned", [
    ([], "tensor"),  # one colocated TP-1 server: CUDA IPC on GPU
    (["rollout.sglang_num_servers=2"], "disk"),
    (["rollout.sglang_tp_size=2"], "disk"),
    (["rollout.colocate=false", "rollout.rollout_nodes=1"], "disk"),
])
def test_auto_weight_sync_of_sglang(overrides, planned):
    from dapo_megatron.placement import make_plan
    from dapo_megatron.rollout.backends import SGLangBackend

    cfg = build_config(TOY, ["rollout.backend=sglang", *overrides])
    nodes = 2 if cfg.rollout.rollout_nodes else 1
    assert make_plan(cfg, nodes=nodes, gpus_per_node=2).sync_mode == planned
    backend = object.__new__(SGLangBackend)  # the mode is decided before any server starts
    backend.cfg = cfg.rollout
    assert backend.weight_sync_mode() == "disk"  # this machine has no CUDA: no IPC handle to give (disk, as run)


def test_a_taken_port_is_refused_before_anything_starts(tmp_path):
    import socket

    from dapo_megatron.rollout.sglang_launcher import SGLangServers

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        s = SGLangServers("m", base_port=held.getsockname()[1], python="/nonexistent", log_dir=tmp_path, device="cpu")
        with pytest.raises(RuntimeError, match=f"port {held.getsockname()[1]} on 127.0.0.1 is in use"):
            s.start()
    assert s.processes == {}


def test_cpu_threads_bind_splits_the_cores_one_group_per_rank():
    assert cpu_threads_bind(2, [0, 1]) == "0|1"
    assert cpu_threads_bind(2, [0, 1, 2, 3, 4]) == "0,1,2|3,4"
    assert cpu_threads_bind(3, [4, 5]) == "4|5|4"  # more ranks than cores: shared round-robin
    assert cpu_threads_bind(1, [0, 1]) == "0,1"


def test_two_cpu_servers_each_get_their_own_cores(tmp_path, monkeypatch):
    """sglang on CPU binds server i (gpu id i) to NUMA node i by default: a second server dies on a one-node host."""
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    two = servers_for("m", rollout("rollout.sglang_num_servers=2"), log_dir=tmp_path, device="cpu")
    bind = two.server_env()["SGLANG_CPU_OMP_THREADS_BIND"].split("|")
    assert len(bind) == 2 and [two.server_command(i)[two.server_command(i).index("--base-gpu-id") + 1]
                                for i in range(2)] == ["0", "1"]  # sglang indexes the bind list by gpu id
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in servers_for("m", rollout(), log_dir=tmp_path,
                                                            device="cpu").server_env()  # one rank: sglang's own
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|0")
    assert two.server_env()["SGLANG_CPU_OMP_THREADS_BIND"] == "0|0"  # the user's own binding wins
