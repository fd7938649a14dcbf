"""Start real SGLang servers (GPU, or CPU for tests) and optionally sglang-router in front of them.

    with SGLangServers(model_dir, num_servers=2, tp_size=4, mem_fraction_static=0.7, base_port=30000,
                       enable_memory_saver=True, router=True) as servers:
        client = servers.client(max_concurrency=256)
        ...
        with servers.memory_released():      # colocated: free the engines' GPU memory while training
            train_step()

Server i runs `python -m sglang.launch_server` on port `base_port + 10 * i` and GPUs
`base_gpu_id + i * tp_size ... + tp_size - 1`; the router (`python -m sglang_router.launch_router --worker-urls ...`)
listens on `router_port` (default `base_port - 1`). Each process logs to `log_dir/<name>.log`; a server that exits or
stays unhealthy past `startup_timeout_s` raises with the tail of its log. Processes are stopped on `shutdown()`, on
leaving the `with` block, and at interpreter exit.

On a machine without CUDA (`device="cpu"`, the default there) the servers run SGLang's CPU engine: env
SGLANG_USE_CPU_ENGINE=1 (without it sglang takes a GPU path and fails importing vllm), `--device cpu
--attention-backend torch_native --disable-overlap-schedule`, `--dtype float32` (what the CPU trainer computes in)
unless dtype or sglang_extra_args name one, and the KV pool capped at CPU_MAX_TOTAL_TOKENS (SGLang
sizes it from host memory otherwise: ~2.2 GB at --mem-fraction-static 0.1). PyPI has no CPU build of sgl_kernel: the
tools venv of tools/setup_sglang_cpu.sh has a test stand-in; a real one comes from building sglang's sgl-kernel.
"""
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from .server import log_tail, wait_for_health

PORT_STRIDE = 10  # ports per server: the HTTP port, its NCCL port (port + 1), spare room
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-overlap-schedule")
CPU_MAX_TOTAL_TOKENS = 16384  # KV slots per CPU server unless sglang_extra_args names --max-total-tokens
# Flags the launcher sets from config: a second copy in rollout.sglang_extra_args would silently win (argparse keeps
# the last), so validation refuses them there.
OWNED_FLAGS = ("--model-path", "--host", "--port", "--nccl-port", "--tp-size", "--tp", "--base-gpu-id",
               "--mem-fraction-static", "--random-seed", "--api-key", "--ep-size", "--ep", "--device",
               "--enable-memory-saver", "--enable-return-routed-experts")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"



def free_port_block(width: int = 40) -> int:
    """A base port whose `width` ports are all free (servers use base + 10 * i and + 1), below the kernel's
    ephemeral range: a block there could be handed to anyone who binds port 0 (a process group's store, a zmq
    socket) between this check and the server's start."""
    import random
    import socket

    try:
        ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    lo, hi = 20000, max(min(32000, ephemeral_low), 20000 + 100 * width)
    for _ in range(100):
        base = random.randrange(lo, hi - width)
        try:
            for port in range(base, base + width):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


class SGLangServers:
    def __init__(self, model_path, num_servers: int = 1, tp_size: int = 1, mem_fraction_static: float = 0.8,
                 base_port: int = 30000, enable_memory_saver: bool = False, router: bool = False, *,
                 host: str = "127.0.0.1", router_port: Optional[int] = None, router_policy: str = "cache_aware",
                 base_gpu_id: int = 0, dtype: Optional[str] = None, seed: int = 0, extra_args=(),
                 log_dir=None, startup_timeout_s: float = 900.0, python: str = sys.executable,
                 api_key: Optional[str] = None, ep_size: int = 1, url_host: Optional[str] = None,
                 enable_return_routed_experts: bool = False, device: Optional[str] = None):
        if num_servers < 0 or tp_size < 1:  # 0 servers: only a router, over `remote_worker_urls`
            raise ValueError(f"num_servers must be >= 0 and tp_size >= 1, got {num_servers} and {tp_size}")
        if not 0 < mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
        if ep_size < 1 or tp_size % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide tp_size={tp_size} (SGLang's --ep-size)")
        self.device = device or default_device()
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        if self.device == "cpu" and enable_memory_saver:
            raise ValueError("enable_memory_saver releases GPU memory (torch_memory_saver); not on device=cpu")
        self.ep_size = ep_size  # MoE expert parallelism inside each server
        self.enable_return_routed_experts = enable_return_routed_experts  # R3: meta_info.routed_experts
        self.model_path, self.num_servers, self.tp_size = str(model_path), num_servers, tp_size
        self.mem_fraction_static, self.base_port, self.host = mem_fraction_static, base_port, host
        self.url_host = url_host or host  # where others reach them (host may be 0.0.0.0)
        self.remote_worker_urls: list = []  # other nodes' servers (rank 0: the router and control calls reach them)
        self.enable_memory_saver, self.router = enable_memory_saver, router
        self.router_port = router_port if router_port is not None else base_port - 1
        self.router_policy, self.base_gpu_id, self.dtype, self.seed = router_policy, base_gpu_id, dtype, seed
        self.extra_args, self.python, self.startup_timeout_s = list(extra_args), python, startup_timeout_s
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="sglang-logs-"))
        self.api_key = api_key  # SGLang's --api-key (servers and router); `Authorization: Bearer` on every call
        self.processes: dict = {}  # name -> (Popen, log path)
        self.supervisor = None  # supervise(): restarts a server that dies or hangs
        self._atexit_registered = False

    # ------------------------------------------------------------------ commands
    def server_port(self, i: int) -> int:
        return self.base_port + PORT_STRIDE * i

    @property
    def local_urls(self) -> list:
        return [f"http://{self.url_host}:{self.server_port(i)}" for i in range(self.num_servers)]

    @property
    def worker_urls(self) -> list:
        return self.local_urls + list(self.remote_worker_urls)

    @property
    def router_url(self) -> Optional[str]:
        return f"http://{self.url_host}:{self.router_port}" if self.router else None

    @property
    def generate_urls(self) -> list:
        """Where /generate goes: the router if there is one, else every worker."""
        return [self.router_url] if self.router else self.worker_urls

    def server_command(self, i: int) -> list:
        port = self.server_port(i)
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path, "--host", self.host,
               "--port", str(port), "--nccl-port", str(port + 1), "--tp-size", str(self.tp_size),
               "--base-gpu-id", str(self.base_gpu_id + i * self.tp_size),
               "--mem-fraction-static", str(self.mem_fraction_static), "--random-seed", str(self.seed + i),
               "--trust-remote-code"]
        if self.ep_size > 1:
            cmd += ["--ep-size", str(self.ep_size)]
        if self.enable_return_routed_experts:
            cmd.append("--enable-return-routed-experts")
        dtype = self.dtype
        if dtype is None and self.device == "cpu" and "--dtype" not in self.extra_args:
            dtype = "float32"  # the CPU trainer's; sglang's "auto" serves a float32 checkpoint in float16
        if dtype:
            cmd += ["--dtype", dtype]
        if self.enable_memory_saver:
            cmd.append("--enable-memory-saver")
        if self.api_key:
            cmd.append(f"--api-key={self.api_key}")  # one token: argparse takes a key starting with '-' for a flag
        if self.device == "cpu":
            cmd += CPU_FLAGS
            if "--max-total-tokens" not in self.extra_args:
                cmd += ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]
        return cmd + [str(a) for a in self.extra_args]

    def server_env(self) -> dict:
        if self.device != "cpu":
            return {**os.environ}
        env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
        ranks = self.base_gpu_id + self.num_servers * self.tp_size
        if ranks > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
            # sglang on CPU binds rank `gpu_id` to NUMA node `gpu_id` unless told otherwise, so a second server on a
            # one-node host dies at start ("NUMA index 1 ... out of range"): give each rank its own cores instead.
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(ranks, sorted(os.sched_getaffinity(0)))
        return env

    def router_command(self) -> list:
        return [self.python, "-m", "sglang_router.launch_router", "--worker-urls", *self.worker_urls,
                "--host", self.host, "--port", str(self.router_port), "--policy", self.router_policy,
                *([f"--api-key={self.api_key}"] if self.api_key else [])]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SGLangServers":
        if not self._atexit_registered:
            atexit.register(self.shutdown)
            self._atexit_registered = True
        try:
            for i in range(self.num_servers):  # launch all, then wait: they load weights in parallel
                for port in (self.server_port(i), self.server_port(i) + 1):  # its HTTP port and its --nccl-port
                    _check_port_free(self.host, port)
                self._spawn(f"sglang-{i}", self.server_command(i))
            for i, url in enumerate(self.local_urls):
                self._wait(f"sglang-{i}", url)
            if self.router:
                self.start_router()
        except BaseException:
            self.shutdown()
            raise
        return self

    def start_router(self):
        """The router over `worker_urls` (this node's servers and `remote_worker_urls`)."""
        self.router = True
        _check_port_free(self.host, self.router_port)
        self._spawn("router", self.router_command())
        self._wait("router", self.router_url)

    def supervise(self, catch_up=None, **kwargs):
        """Watch this node's servers (rollout/supervisor.py `EngineSupervisor`, kwargs: health_interval_s,
        max_restarts, window_s): one that dies or hangs is killed with its process group, started again with the
        same command on the same ports, caught up (`catch_up(url)`: disk sync loads the last synced folder) and put
        back behind the client, and behind the router, which keeps its worker URL. `shutdown()` stops it first."""
        from .supervisor import EngineSupervisor

        def launch(i, env):  # env: None at the first call (the server start() started), else a restart
            name = f"sglang-{i}"
            if env is not None:
                deadline = time.monotonic() + 60
                while True:  # the killed group's sockets: gone with its processes, which the kernel reaps
                    try:
                        _check_port_free(self.host, self.server_port(i))
                        break
                    except RuntimeError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                self._spawn(name, self.server_command(i))
                self._wait(name, self.local_urls[i])
            return _ServerHandle(self, i)

        self.supervisor = EngineSupervisor(launch, self.num_servers, catch_up=catch_up, **kwargs)
        return self.supervisor

    def _spawn(self, name: str, cmd: list):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "w") as log_file:
            # Own process group: SGLang forks scheduler/detokenizer processes that must stop with it.
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=self.server_env())
        self.processes[name] = (proc, log_path)

    def _wait(self, name: str, url: str):
        proc, log_path = self.processes[name]
        try:
            wait_for_health(url, self.startup_timeout_s, process=proc, log_path=log_path, interval_s=2.0)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{name} ({' '.join(self.processes[name][0].args[:3])}...) failed to start: {e}") \
                from None

    def shutdown(self, timeout_s: float = 30.0):
        """SIGTERM every process group, SIGKILL what is left after `timeout_s`."""
        if self.supervisor is not None:  # first: a server stopped here is not one to restart
            self.supervisor.shutdown()
            self.supervisor = None
        for proc, _ in self.processes.values():
            _signal_group(proc, signal.SIGTERM)
        for proc, _ in self.processes.values():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.processes.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def logs(self, lines: int = 40) -> dict:
        return {name: log_tail(path, lines) for name, (_, path) in self.processes.items()}

    # ------------------------------------------------------------------ colocation
    def release_memory_occupation(self, tags: Optional[list] = None):
        """Free the engines' weights and KV cache on the GPU (needs enable_memory_saver) before training."""
        self._post_all("/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: Optional[list] = None):
        self._post_all("/resume_memory_occupation", {"tags": tags})

    @contextlib.contextmanager
    def memory_released(self, tags: Optional[list] = None):
        """`with servers.memory_released(): train()`: the engines give their GPU memory back meanwhile."""
        if not self.enable_memory_saver:
            raise RuntimeError("memory_released() needs SGLangServers(enable_memory_saver=True)")
        self.release_memory_occupation(tags)
        try:
            yield
        finally:
            self.resume_memory_occupation(tags)

    def _post_all(self, path: str, payload: dict, timeout_s: float = 300.0):
        for url in self.worker_urls:
            req = urllib.request.Request(url + path, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json", **self._auth()})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as r:
                    r.read()
            except OSError as e:
                raise RuntimeError(f"{url}{path} failed: {e}") from None

    def _auth(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        """A RolloutClient for these servers (generation through the router if any; control calls to workers)."""
        from .client import RolloutClient

        kwargs.setdefault("api_key", self.api_key)
        return RolloutClient(self.generate_urls, worker_urls=self.worker_urls, **kwargs)


def cpu_threads_bind(ranks: int, cpus: list) -> str:
    """SGLang's SGLANG_CPU_OMP_THREADS_BIND for `ranks` CPU ranks (rank i = gpu id i): `cpus` split into contiguous
    disjoint groups, the first groups one core larger when they do not divide evenly; with more ranks than cores,
    ranks share cores round-robin ("0|1|0" for 3 ranks on 2 cores)."""
    if ranks > len(cpus):
        return "|".join(str(cpus[i % len(cpus)]) for i in range(ranks))
    size, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for i in range(ranks):
        n = size + (i < extra)
        groups.append(cpus[start:start + n])
        start += n
    return "|".join(",".join(map(str, g)) for g in groups)


class _ServerHandle:
    """Server i of an SGLangServers as the supervisor sees an engine: url, process, log, kill, shutdown."""

    def __init__(self, servers: SGLangServers, i: int):
        self.url = servers.local_urls[i]
        self.process, self.log_path = servers.processes[f"sglang-{i}"]

    def kill(self):
        _signal_group(self.process, signal.SIGKILL)

    def shutdown(self):
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()


def servers_for(model_path, rollout, **kwargs) -> SGLangServers:
    """The (not yet started) servers a `rollout` config section asks for; `server_command(i)` / `router_command()`
    give their command lines without starting anything."""
    device = kwargs.pop("device", None) or default_device()
    kwargs = {"enable_memory_saver": rollout.colocate and device == "cuda", "router": rollout.sglang_router,
              "device": device, "python": rollout.sglang_python or sys.executable,
              "extra_args": list(rollout.sglang_extra_args),
              "ep_size": rollout.sglang_ep_size,
              "enable_return_routed_experts": getattr(rollout, "return_routed_experts", False), **kwargs}
    num_servers = kwargs.pop("num_servers", rollout.sglang_num_servers)  # per node: the plan's share of this node
    base_port = kwargs.pop("base_port", rollout.sglang_base_port)
    return SGLangServers(model_path, num_servers, rollout.sglang_tp_size,
                         rollout.sglang_mem_fraction_static, base_port, **kwargs)


def _check_port_free(host: str, port: int):
    """A server on a port someone else holds would fail to bind, and the health wait would meet the other process
    (a stale server of an earlier run answers /health too): refuse before starting."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise RuntimeError(f"port {port} on {host} is in use (another server?): stop it or set "
                               f"rollout.sglang_base_port to a free range") from None


def _signal_group(proc: subprocess.Popen, sig):
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
