"""Tools a multi-turn rollout can call (rollout/multi_turn.py), chosen by registered name, like the verifiers.

A tool registers itself where it is defined:

    @register_tool("calculator", arg="expression")
    def calculator(args: dict, limits: ToolLimits) -> str: ...

`arg` names the argument that the body of a fenced code block fills (the base-model call format, tools/formats.py).
A tool returns the text the model reads, or raises `ToolError` (a one-line message back to the model) or
`ToolTimeout`. Every module of this package is imported on the first lookup, so a new tool module needs no other edit.
A tool outside the package is named `module:function` and called as `function(**arguments) -> str` in a thread (its
schema: one string argument per parameter, the first filled by a fenced block, and its docstring's first line; its
time limit is a wait: a thread cannot be killed, so a user tool that never returns holds that thread).
"""
import asyncio
import importlib
import inspect
import pkgutil
import time
from dataclasses import dataclass
from typing import Callable, Optional


class ToolError(Exception):
    """The call failed (bad arguments, the code raised): the message goes back to the model."""


class ToolTimeout(ToolError):
    """The call ran past its wall-time limit."""


@dataclass(frozen=True)
class ToolLimits:
    timeout_s: float = 10.0  # wall time of one call
    max_output_chars: int = 1024  # the text back to the model is cut to this
    memory_mb: int = 512  # python: address-space rlimit of the sandbox process


@dataclass(frozen=True)
class ToolSpec:
    fn: Callable
    arg: str  # the argument a fenced code block's body fills
    description: str = ""
    parameters: Optional[dict] = None  # JSON schema of the arguments; None: one string argument `arg`

    def schema(self, name: str) -> dict:
        """The tool as a chat template's `tools=` entry (the OpenAI function format Qwen2.5 / Hermes templates read)."""
        params = self.parameters or {"type": "object", "properties": {self.arg: {"type": "string"}},
                                     "required": [self.arg]}
        return {"type": "function", "function": {"name": name, "description": self.description,
                                                 "parameters": params}}


@dataclass(frozen=True)
class ToolOutcome:
    text: str  # what the model reads (one line for errors and timeouts)
    status: str  # ok | error | timeout
    seconds: float


TOOLS: dict = {}  # name -> ToolSpec, filled by @register_tool


def register_tool(name: str, *, arg: str, description: str = "", parameters: Optional[dict] = None):
    def wrap(fn):
        TOOLS[name] = ToolSpec(fn, arg, description, parameters)
        return fn
    return wrap


def _load_all() -> dict:
    package = importlib.import_module(__name__)
    for m in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__name__}.{m.name}")
    return TOOLS


def tool_names() -> list:
    return sorted(_load_all())


def get_tool(name: str) -> ToolSpec:
    """A registered tool, or `module:function` (called with the call's arguments as keywords)."""
    spec = TOOLS.get(name) or _load_all().get(name)
    if spec is not None:
        return spec
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"rollout.multi_turn.tools: cannot load {name!r} ({e}); give module:function of an "
                             "importable module") from None
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        schema = {"type": "object", "properties": {p.name: {"type": "string"} for p in params},
                  "required": [p.name for p in params if p.default is p.empty]}
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        return ToolSpec(lambda args, limits, _fn=fn: _fn(**args), params[0].name if params else "input", doc, schema)
    raise ValueError(f"rollout.multi_turn.tools: {name!r} is unknown; use one of {', '.join(tool_names())} "
                     "or module:function")


def tool_label(name: str) -> str:
    """The name a model writes for a tool: a user tool `pkg.mod:fn` is called `fn`."""
    return name.rpartition(":")[2]


def _one_line(text: str, limit: int) -> str:
    line = " ".join(str(text).split())
    return line[:limit]


def run_tool(spec: ToolSpec, args: dict, limits: ToolLimits) -> ToolOutcome:
    """Run one call synchronously; never raises: errors and timeouts come back as one line for the model."""
    start = time.monotonic()
    try:
        text, status = str(spec.fn(args, limits)), "ok"
    except ToolTimeout as e:
        text, status = _one_line(f"Error: timeout: {e}", limits.max_output_chars), "timeout"
    except Exception as e:  # noqa: BLE001 (a tool's failure is the model's information, not the trainer's)
        msg = f"Error: {e}" if isinstance(e, ToolError) else f"Error: {type(e).__name__}: {e}"
        text, status = _one_line(msg, limits.max_output_chars), "error"
    return ToolOutcome(text[:limits.max_output_chars], status, time.monotonic() - start)


async def arun_tool(spec: ToolSpec, args: dict, limits: ToolLimits, executor=None) -> ToolOutcome:
    """`run_tool` in `executor`, off the event loop, so that other samples keep generating. A call that outlives its
    time limit by a grace second once it has started (a user tool the sandbox does not cover) is answered as a
    timeout; the time a call waits for a free worker does not count."""
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    def job():
        loop.call_soon_threadsafe(started.set)
        return run_tool(spec, args, limits)

    fut = asyncio.ensure_future(loop.run_in_executor(executor, job))
    start = asyncio.ensure_future(started.wait())
    try:
        await asyncio.wait({fut, start}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        start.cancel()
    t0 = time.monotonic()
    done, _ = await asyncio.wait({fut}, timeout=limits.timeout_s + 1.0)
    if fut in done:
        return fut.result()
    return ToolOutcome(f"Error: timeout: no answer within {limits.timeout_s:g}s", "timeout", time.monotonic() - t0)
