"""HTTP server for the embedded engine, speaking the subset of SGLang's native API the trainer uses.

    python -m dapo_megatron.rollout.server --model-path DIR --port 30000 [--host 127.0.0.1]

Endpoints (SGLang's names and payloads): /generate, /health, /health_generate, /get_model_info, /get_weight_version,
/get_server_info, /flush_cache, /abort_request, /pause_generation, /continue_generation, /update_weights_from_disk,
/release_memory_occupation and /resume_memory_occupation (no-ops on CPU, so colocated code runs unchanged).
/update_weights_from_tensor needs the engine in the same process: use `RolloutClient(engine=...)` or weight sync
mode "tensor"; over HTTP it answers 400. NCCL weight updates (/init_weights_update_group ...) need real SGLang.

`dispatch()` is the one implementation of the API: the aiohttp app and the in-process client both call it.
Bad requests get HTTP 400 with {"object": "error", "message": ...} and the server keeps serving.
The launcher for real `sglang.launch_server` processes is in `sglang_launcher.py`.
"""
import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from ..train.faults import engine_fault
from .engine import PAUSE_MODES, Engine, SamplingParams

log = logging.getLogger(__name__)

HEALTH_GENERATE_TIMEOUT_S = 20.0


class ApiError(ValueError):
    """A request the API rejects (HTTP 400)."""


API_KEY_ENV = "DAPO_ROLLOUT_API_KEY"


def _error(status: int, message: str):
    return status, {"object": "error", "message": message, "type": "BadRequest" if status == 400 else "Error",
                    "code": status}


async def dispatch(engine: Engine, path: str, payload) -> tuple:
    """Serve one API call: returns (HTTP status, JSON-able body or text)."""
    route = _ROUTES.get(path)
    if route is None:
        return _error(404, f"unknown endpoint {path}; see dapo_megatron.rollout.server for the supported ones")
    if payload is not None and not isinstance(payload, dict):
        return _error(400, f"{path}: the request body must be a JSON object")
    await engine_fault(path, payload, engine.weight_version)  # DAPO_FAULT engine points (tests, drills); else no-op
    try:
        return await route(engine, payload or {})
    except ValueError as e:  # includes ApiError and engine validation errors
        return _error(400, str(e))
    except Exception as e:  # noqa: BLE001 - report, keep serving
        log.exception("%s failed", path)
        return _error(500, f"{path} failed: {e!r}")


# --------------------------------------------------------------------------- /generate
def _as_batch(value, name: str, size: int, batched: bool) -> list:
    if not batched or not isinstance(value, list):
        return [value] * size
    if len(value) != size:
        raise ApiError(f"{name} has {len(value)} entries for a batch of {size} prompts")
    return value


def _prompts(engine: Engine, payload: dict) -> tuple:
    text, input_ids = payload.get("text"), payload.get("input_ids")
    if (text is None) == (input_ids is None):
        raise ApiError("provide exactly one of text or input_ids")
    if input_ids is not None:
        batched = isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
        prompts = input_ids if batched else [input_ids]
    else:
        batched = isinstance(text, list)
        texts = text if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ApiError("text must be a string or a list of strings")
        prompts = [engine.tokenizer.encode(t) for t in texts]
    if batched and not prompts:
        raise ApiError("the batch of prompts is empty")
    return [engine.check_input_ids(p) for p in prompts], batched


async def _generate(engine: Engine, payload: dict):
    if payload.get("stream"):
        raise ApiError("stream=true is not supported by the embedded engine")
    prompts, batched = _prompts(engine, payload)
    size = len(prompts)
    params = [SamplingParams.from_dict(sp) for sp in
              _as_batch(payload.get("sampling_params"), "sampling_params", size, batched)]
    rids = payload.get("rid")
    if batched and isinstance(rids, str):
        rids = [f"{rids}_{i}" for i in range(size)]
    rids = _as_batch(rids, "rid", size, batched)
    logprob = _as_batch(payload.get("return_logprob", False), "return_logprob", size, batched)
    texts = bool(payload.get("return_text_in_logprobs", False))
    experts = bool(payload.get("return_routed_experts", False))  # SGLang's flag: meta_info.routed_experts
    outs = await asyncio.gather(*[
        engine.generate(p, sp, rid=rid, return_logprob=bool(lp), return_text_in_logprobs=texts,
                        return_routed_experts=experts)
        for p, sp, rid, lp in zip(prompts, params, rids, logprob)])
    flat = [o for group in outs for o in group]
    return 200, (flat if batched or len(flat) > 1 else flat[0])


# --------------------------------------------------------------------------- control
async def _health(engine: Engine, payload: dict):
    return (200, "") if engine.is_alive else (503, "")


async def _health_generate(engine: Engine, payload: dict):
    if not engine.is_alive:
        return 503, ""
    if engine.is_paused:
        return 200, ""
    try:
        await asyncio.wait_for(engine.generate([0], {"max_new_tokens": 1, "temperature": 0.0}),
                               HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return 503, ""
    return 200, ""


async def _model_info(engine: Engine, payload: dict):
    return 200, engine.get_model_info()


async def _weight_version(engine: Engine, payload: dict):
    return 200, {"weight_version": engine.weight_version}


async def _server_info(engine: Engine, payload: dict):
    return 200, {**engine.get_model_info(), "engine": "dapo_megatron embedded", "max_batch_size":
                 engine.max_batch_size, "dtype": str(engine.dtype), "device": str(engine.device),
                 "num_requests": engine.num_requests, "paused": engine.is_paused,
                 "engine_load": engine.load_stats()}  # busy counters (rollout/engine_load.py)


async def _flush_cache(engine: Engine, payload: dict):
    engine.flush_cache()
    return 200, "Cache flushed.\n"


async def _abort(engine: Engine, payload: dict):
    if not payload.get("abort_all") and not payload.get("rid"):
        raise ApiError("abort_request needs a rid or abort_all: true")
    engine.abort_request(payload.get("rid"), abort_all=bool(payload.get("abort_all")))
    return 200, ""


async def _pause(engine: Engine, payload: dict):
    mode = payload.get("mode", "abort")
    if mode not in PAUSE_MODES:
        raise ApiError(f"pause_generation mode must be one of {PAUSE_MODES}, got {mode!r}")
    await asyncio.to_thread(engine.pause_generation, mode)
    return 200, {"message": "Generation paused successfully.", "status": "ok"}


async def _continue(engine: Engine, payload: dict):
    engine.continue_generation()
    return 200, {"message": "Generation continued successfully.", "status": "ok"}


async def _update_from_disk(engine: Engine, payload: dict):
    if not payload.get("model_path"):
        raise ApiError("update_weights_from_disk needs model_path")
    try:
        out = await asyncio.to_thread(engine.update_weights_from_disk, payload["model_path"],
                                      weight_version=payload.get("weight_version"),
                                      abort_all_requests=bool(payload.get("abort_all_requests", False)))
    except (ValueError, OSError) as e:
        return 400, {"success": False, "message": str(e), "num_paused_requests": 0}
    return 200, out


async def _memory_noop(engine: Engine, payload: dict):
    return 200, {"success": True, "message": "the embedded CPU engine holds no GPU memory"}


def _unsupported(why: str):
    async def route(engine: Engine, payload: dict):
        return 400, {"success": False, "message": why}
    return route


_ROUTES = {
    "/generate": _generate, "/health": _health, "/health_generate": _health_generate,
    "/get_model_info": _model_info, "/get_weight_version": _weight_version, "/get_server_info": _server_info,
    "/flush_cache": _flush_cache, "/abort_request": _abort, "/pause_generation": _pause,
    "/continue_generation": _continue, "/update_weights_from_disk": _update_from_disk,
    "/release_memory_occupation": _memory_noop, "/resume_memory_occupation": _memory_noop,
    "/update_weights_from_tensor": _unsupported(
        "update_weights_from_tensor needs the engine in the trainer's process: use RolloutClient(engine=...) or "
        "weight sync mode 'tensor'; over HTTP use update_weights_from_disk"),
}
for _path in ("/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group"):
    _ROUTES[_path] = _unsupported(f"{_path} (NCCL weight sync) needs a real SGLang server; the embedded engine "
                                  "supports weight sync modes 'disk' and 'tensor'")


async def _weights_digest(engine: Engine, payload: dict):  # the sync's equality check (train/sync_check.py)
    from .weights_digest import weights_digest

    return 200, await asyncio.to_thread(weights_digest, engine.model)


_ROUTES["/debug/weights_digest"] = _weights_digest


# --------------------------------------------------------------------------- aiohttp app
MAX_JSON_DEPTH = 64  # SGLang payloads nest 3-4 levels; a deeper body is refused (400), never a 500
DEFAULT_MAX_N = 1024
DEFAULT_MAX_BODY_BYTES = 256 << 20


def parse_body(raw: bytes, max_n: int = DEFAULT_MAX_N):
    """The JSON object of a request body, or ApiError (HTTP 400) for anything malformed or over the caps."""
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; RecursionError: deep nesting
        raise ApiError(f"the request body is not valid JSON ({str(e)[:200]})") from None
    _check_strings(payload)
    if isinstance(payload, dict):
        sps = payload.get("sampling_params")
        for sp in (sps if isinstance(sps, list) else [sps]):
            n = sp.get("n", 1) if isinstance(sp, dict) else 1
            if isinstance(n, int) and n > max_n:
                raise ApiError(f"sampling_params.n={n} exceeds this server's cap of {max_n} (--max-n)")
    return payload


def _check_strings(payload) -> None:
    """Lone surrogates (legal in JSON, not in UTF-8) and nesting deeper than any API payload are refused."""
    stack = [(payload, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError("the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), not text") from None
        elif isinstance(v, dict):
            stack.extend((x, depth + 1) for x in (*v.keys(), *v.values()))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def build_app(engine: Engine, max_n: int = DEFAULT_MAX_N, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *,
              api_key: Optional[str] = None, weights_root=None):
    """`api_key`: every path but /health needs `Authorization: Bearer <api_key>` (SGLang's --api-key), else 401.
    `weights_root`: /update_weights_from_disk reads only folders under it, else 403."""
    from aiohttp import web

    async def handle(request):
        refused = _refuse(request, api_key)
        if refused:
            return web.json_response(refused[1], status=refused[0])
        payload = None
        if request.can_read_body:
            try:
                payload = parse_body(await request.read(), max_n)
            except web.HTTPRequestEntityTooLarge:
                status, body = _error(413, f"{request.path}: the request body exceeds {max_body_bytes} bytes "
                                           "(--max-body-bytes)")
                return web.json_response(body, status=status)
            except ApiError as e:
                status, body = _error(400, f"{request.path}: {e}")
                return web.json_response(body, status=status)
        if request.path == "/update_weights_from_disk" and weights_root is not None \
                and not _under(payload.get("model_path") if isinstance(payload, dict) else None, weights_root):
            return web.json_response(_error(403, f"update_weights_from_disk reads only under {weights_root}")[1],
                                     status=403)
        status, body = await dispatch(engine, request.path, payload)
        if isinstance(body, str):
            return web.Response(text=body, status=status)
        return web.json_response(body, status=status)

    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _refuse(request, api_key):
    import hmac

    if not api_key or request.path == "/health":
        return None
    given = request.headers.get("Authorization", "")
    if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        return None
    return _error(401, "missing or wrong API key (send Authorization: Bearer <key>)")


def _under(path, root) -> bool:
    if not path:
        return False
    root = Path(root).resolve()
    target = Path(path).resolve()
    return target == root or root in target.parents


class EmbeddedServer:
    """A running embedded server: `url`; `engine` in thread mode, `process` in subprocess mode."""

    def __init__(self, url: str, *, engine: Optional[Engine] = None, process=None, log_path=None, stop=None):
        self.url, self.engine, self.process, self.log_path, self._stop = url, engine, process, log_path, stop

    def kill(self):
        """SIGKILL the server process (subprocess mode): simulates a crash."""
        if self.process is None:
            raise RuntimeError("kill() needs a subprocess server (launch_embedded_server(..., mode='subprocess'))")
        self.process.kill()
        self.process.wait()

    def shutdown(self):
        if self._stop is not None:
            self._stop()
            self._stop = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_embedded_server(model_path, port: int = 0, *, host: str = "127.0.0.1", mode: str = "thread",
                           engine: Optional[Engine] = None, startup_timeout_s: float = 120.0,
                           api_key: Optional[str] = None, weights_root=None, env: Optional[dict] = None,
                           **engine_kwargs) -> EmbeddedServer:
    """Serve `model_path` on http://host:port (port 0: a free one). mode "thread": in this process, the engine is
    `handle.engine`; mode "subprocess": `python -m dapo_megatron.rollout.server`, killable like a real server."""
    if mode == "thread":  # max_n / max_body_bytes are the app's caps; in subprocess mode they become --max-n ...
        limits = {k: engine_kwargs.pop(k) for k in ("max_n", "max_body_bytes") if k in engine_kwargs}
        return _launch_thread(engine or Engine(model_path, **engine_kwargs), host, port, startup_timeout_s, limits,
                              api_key=api_key, weights_root=weights_root)
    if mode == "subprocess":
        return _launch_subprocess(model_path, host, port or free_port(host), startup_timeout_s, engine_kwargs,
                                  api_key=api_key, weights_root=weights_root, env=env)
    raise ValueError(f"mode must be 'thread' or 'subprocess', got {mode!r}")


def _launch_thread(engine: Engine, host: str, port: int, timeout_s: float, limits=None, api_key=None,
                   weights_root=None) -> EmbeddedServer:
    from aiohttp import web

    loop, ready, state = asyncio.new_event_loop(), threading.Event(), {}

    def run():
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(build_app(engine, **(limits or {}), api_key=api_key, weights_root=weights_root),
                               handler_cancellation=True, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            state["port"] = runner.addresses[0][1]
        except Exception as e:  # noqa: BLE001 - handed to the launching thread
            state["error"] = e
        ready.set()
        if "error" not in state:
            loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="rollout-http", daemon=True)
    thread.start()
    ready.wait(timeout_s)
    if "port" not in state:
        engine.shutdown()
        raise RuntimeError(f"embedded server could not listen on {host}:{port}: {state.get('error')!r}")

    def stop():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        engine.shutdown()

    return EmbeddedServer(f"http://{host}:{state['port']}", engine=engine, stop=stop)


def _launch_subprocess(model_path, host: str, port: int, timeout_s: float, engine_kwargs: dict, api_key=None,
                       weights_root=None, env=None) -> EmbeddedServer:
    cmd = [sys.executable, "-m", "dapo_megatron.rollout.server", "--model-path", str(model_path), "--host", host,
           "--port", str(port)]
    if weights_root is not None:
        cmd += ["--weights-root", str(weights_root)]
    for key, value in engine_kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value).replace("torch.", "")]
    repo_root = str(Path(__file__).resolve().parents[2])
    base = os.environ if env is None else env  # env: a restarted engine's (supervisor.py), else this process's
    env = {**base, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, base.get("PYTHONPATH")]))}
    if api_key:
        env[API_KEY_ENV] = api_key  # the environment, not argv: `ps` shows argv to every user
    log_path = Path(tempfile.mkstemp(prefix=f"rollout-server-{port}-", suffix=".log")[1])
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://{host}:{port}"
    server = EmbeddedServer(url, process=proc, log_path=log_path)
    try:
        wait_for_health(url, timeout_s, process=proc, log_path=log_path)
    except Exception:
        server.shutdown()
        raise
    return server


def wait_for_health(url: str, timeout_s: float, *, process=None, log_path=None, interval_s: float = 0.2):
    """Poll `url`/health until 200; fail early, with the log's tail, if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server {url} exited with code {process.returncode} before becoming healthy; "
                               f"log {log_path}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"server {url} not healthy after {timeout_s:.0f}s; log {log_path}:\n{log_tail(log_path)}")


def log_tail(log_path, lines: int = 40) -> str:
    if log_path is None or not Path(log_path).is_file():
        return "(no log)"
    return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dapo-megatron serve", description="Serve an HF model folder with the "
                                "embedded engine behind SGLang's native HTTP API.")
    p.add_argument("--model-path", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=64, help="rows decoded together (continuous batching)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--log-level", default="info")
    p.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, help="largest sampling_params.n accepted (400 above)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body accepted (413 above)")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    p.add_argument("--weights-root", default=None, help="update_weights_from_disk reads only under this folder")
    return p.parse_args(argv)


def main(argv=None):
    from aiohttp import web

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(args.model_path, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
                    seed=args.seed, tokenizer_path=args.tokenizer_path)
    try:
        app = build_app(engine, args.max_n, args.max_body_bytes, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                        weights_root=args.weights_root)
        web.run_app(app, host=args.host, port=args.port, handler_cancellation=True, access_log=None,
                    print=lambda *_: print(f"rollout server ready on http://{args.host}:{args.port}", flush=True))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
