"""Shared by the tests that run the real PyPI sglang server on CPU (tests/test_sglang_cpu_*.py): where the tools venv
is, the skip when it is missing, and one started server per test module."""
import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "tools" / ".venv-sglang"
TOOLS_PY = VENV / "bin" / "python"
# written last by tools/setup_sglang_cpu.sh once the server imports (the parser-only venv of before wrote another)
SERVER_READY = any(VENV.glob(".ready-sglang-*-server"))
needs_server_venv = pytest.mark.skipif(not SERVER_READY, reason="needs the sglang server venv: bash "
                                       "tools/setup_sglang_cpu.sh")
START_TIMEOUT_S = 300.0  # healthy after ~30-45 s on 2 idle cores; the CI machine is shared
API_KEY = "sglang-cpu-test-key"


def start_servers(model_dir, log_dir, num_servers: int = 1, **kwargs):
    from dapo_megatron.rollout.sglang_launcher import SGLangServers, free_port_block

    servers = SGLangServers(model_dir, num_servers=num_servers, mem_fraction_static=0.1,
                            base_port=free_port_block(), python=str(TOOLS_PY), log_dir=log_dir,
                            startup_timeout_s=START_TIMEOUT_S, api_key=API_KEY, device="cpu",
                            extra_args=["--max-total-tokens", "4096"], **kwargs)
    return servers.start()


def process_tree_alive(pids) -> list:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
            if f.read().split(") ", 1)[1].startswith("Z"):
                continue
        alive.append(pid)
    return alive


def group_pids(pgid: int) -> list:
    """Every live process of one process group (the server and the scheduler/detokenizer it forked)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except ProcessLookupError:
                pass
    return out


def kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def wait_log(servers, name: str, pattern: str, timeout_s: float = 120.0):
    """Until server `name` ("sglang-0", ...) logs `pattern` after this call, bounded (sglang 0.5.23 reports its
    running requests only in its log: one "Decode batch" line per 40 decode steps)."""
    path, want = servers.processes[name][1], re.compile(pattern)
    loop = asyncio.get_running_loop()
    start, deadline = path.stat().st_size, loop.time() + timeout_s
    while loop.time() < deadline:
        with open(path) as f:
            f.seek(start)
            if want.search(f.read()):
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{name} logged no {pattern!r} within {timeout_s}s")


def kill_servers_after_sync(sync_folder: Path, version: int, model_dir, run_dir: Path, timeout_s: float = 600.0,
                            steps: int = 3) -> list:
    """For a run going on in another thread: once its disk sync to `version` is on disk (`weights_v{version:06d}`
    under `sync_folder`: step `version` trained), SIGKILL every real sglang server serving `model_dir`, each with its
    process group (scheduler, detokenizer); returns the PIDs. Bounded; fails if the run had already logged all
    `steps` steps (the kill would then test nothing)."""
    import time

    from tests.test_sglang_cpu_train import servers_of

    folder, deadline = Path(sync_folder) / f"weights_v{version:06d}", time.monotonic() + timeout_s
    while not folder.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"no {folder} within {timeout_s:.0f} s")
        time.sleep(0.05)
    pids = servers_of(model_dir)
    for pid in pids:
        kill_group(pid)  # each server leads its own process group (the launcher starts it in a new session)
    metrics = Path(run_dir) / "metrics.jsonl"
    logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    assert pids and logged < steps, f"killed {pids} with {logged} of {steps} steps logged: too late to test anything"
    return pids
