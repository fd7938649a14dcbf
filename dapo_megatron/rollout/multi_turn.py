"""Multi-turn rollouts with tools, per sample, through the fleet's `generate_group` only (every backend alike).

    generate (stops at a call's closing marker, EOS or the budget) -> parse the call -> run the tool -> append the
    tool's result rendered as a tool message, as token ids -> generate again from prompt + response so far

Token-in/token-out: a sample's `response_ids` are exactly the engine's sampled ids of each turn and the tool-result
ids between them, in order; nothing is decoded and encoded again (text is decoded only to parse calls and for the
verifier). Tool-result tokens have `loss_mask` 0 and `rollout_logprobs` 0.0 (never used: every loss term, count and
metric of the trainer is masked). Model tokens have mask 1.

Budget: `rollout.max_response_length` (eval: `eval.max_response_length`) counts model and tool tokens together (what
the trainer holds per response);
each turn may generate what is left, and a tool result that does not fit is cut to fit and ends the sample with
finish_reason "length". Overlong shaping and the overlong filter (algo/overlong.py) therefore act on the whole
response, model and tool tokens, as DAPO's |y| is the response the trainer sees.

`max_turns` counts model generations: a call in the last one is not run (the sample ends there). The sample's
`weight_version` is the oldest of its turns (a weight sync between turns makes it older, never newer). An aborted
turn aborts the sample (finish_reason "abort": the buffer drops its group, so a resumed run regenerates it).
"""
import asyncio
import concurrent.futures
import dataclasses
from dataclasses import dataclass, field

from ..types import Sample
from .protocol import GenerationParams
from .tools import ToolLimits, ToolOutcome, arun_tool, get_tool, tool_label
from .tools.formats import FORMATS, FencedFormat

STATS = ("turns", "tool_calls", "tool_errors", "tool_timeouts", "tool_s")


@dataclass
class MultiTurnConfig:
    """`rollout.multi_turn`: tool-calling rollouts (off unless enabled)."""
    enabled: bool = False
    max_turns: int = 4  # model generations per sample; a call in the last one is not run
    tools: list = field(default_factory=lambda: ["calculator"])  # registered names (rollout/tools/) or module:fn
    format: str = "hermes"  # hermes (<tool_call>{json}</tool_call>, chat template) | fenced (```tool ... ```)
    tool_timeout_s: float = 10.0  # wall time of one tool call
    max_output_chars: int = 1024  # a tool's text back to the model is cut to this
    python_memory_mb: int = 1024  # python tool: address-space rlimit of its sandbox

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"max_turns={self.max_turns}; use 1 or more")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}; use one of {', '.join(FORMATS)}")
        if self.tool_timeout_s <= 0 or self.max_output_chars < 1 or self.python_memory_mb < 64:
            raise ValueError("tool_timeout_s must be > 0, max_output_chars >= 1 and python_memory_mb >= 64")
        if not self.tools:
            raise ValueError("tools is empty; name at least one tool (e.g. [calculator])")
        labels = [tool_label(t) for t in self.tools]
        if len(set(labels)) < len(labels):
            raise ValueError(f"tools {self.tools} call two tools by the same name")
        for t in self.tools:
            get_tool(t)  # unknown names and unloadable module:function are refused here

    def limits(self) -> ToolLimits:
        return ToolLimits(timeout_s=self.tool_timeout_s, max_output_chars=self.max_output_chars,
                          memory_mb=self.python_memory_mb)


class ToolMessageRenderer:
    """A tool result as the tokens that follow a model turn that made a call.

    hermes: what the chat template renders after an assistant message's content (its end, e.g. `<|im_end|>\\n`) and
    for a `tool` message, with the generation prompt of the next assistant turn; found once by rendering a
    conversation with and without the tool message. fenced: "```output\\n...\\n```\\n"."""

    _SENTINEL, _RESULT = "\x00ASSISTANT\x00", "\x00RESULT\x00"

    def __init__(self, tokenizer, fmt: str):
        self.tokenizer = tokenizer
        if fmt == "fenced":
            self.before, self.after = FencedFormat.render(self._RESULT).split(self._RESULT)
            return
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("rollout.multi_turn.format=hermes needs a tokenizer with a chat template; use "
                             "format=fenced for a base model")
        base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": self._SENTINEL}]
        t1 = tokenizer.apply_chat_template(base, tokenize=False)
        t2 = tokenizer.apply_chat_template(base + [{"role": "tool", "content": self._RESULT}], tokenize=False,
                                           add_generation_prompt=True)
        if not t2.startswith(t1) or t2.count(self._RESULT) != 1:
            raise ValueError("rollout.multi_turn.format=hermes: this chat template does not render a tool message "
                             "after an assistant message as a suffix; use format=fenced")
        close = t1[t1.rindex(self._SENTINEL) + len(self._SENTINEL):]
        self.before, self.after = (close + t2[len(t1):]).split(self._RESULT)

    def text(self, result: str) -> str:
        return self.before + result + self.after

    def ids(self, result: str) -> list:
        return list(self.tokenizer.encode(self.text(result), add_special_tokens=False))


class MultiTurnRunner:
    """Fills a group of prompt-only samples with multi-turn responses (module docstring)."""

    MAX_PARALLEL_TOOLS = 16  # tool calls run at once per runner (threads; the python tool's are subprocesses)

    def __init__(self, cfg: MultiTurnConfig, tokenizer, executor=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.format = FORMATS[cfg.format]()
        self.renderer = ToolMessageRenderer(tokenizer, cfg.format)
        self.specs = {tool_label(t): get_tool(t) for t in cfg.tools}
        self.tool_args = {name: spec.arg for name, spec in self.specs.items()}
        self.limits = cfg.limits()
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(self.MAX_PARALLEL_TOOLS,
                                                                          thread_name_prefix="tool")

    def tool_schemas(self):
        """The chat template's `tools=` (hermes), or None (fenced: a base model's prompt template names its tools)."""
        if self.cfg.format != "hermes":
            return None
        return [spec.schema(name) for name, spec in self.specs.items()]

    async def generate_group(self, fleet, group: list, params: GenerationParams) -> list:
        """The first turn of all samples as one request (one prompt, n = len(group)), then each sample on its own.
        `params.max_tokens` is the budget of the whole response, model and tool tokens."""
        params = dataclasses.replace(params, stop=tuple(self.format.stop))
        await fleet.generate_group(group, params)
        await asyncio.gather(*(self._continue(fleet, s, params) for s in group))
        return group

    async def _continue(self, fleet, s: Sample, params: GenerationParams) -> None:
        ids, logprobs, mask = list(s.response_ids), list(s.rollout_logprobs), [1] * len(s.response_ids)
        last_turn, version = list(s.response_ids), s.weight_version
        versions = s.token_versions()  # per token (partial rollouts); a tool's tokens take the model's before them
        stats = dict.fromkeys(STATS, 0)
        stats["turns"] = 1
        # the response's turns as spans of response_ids: who wrote them (model | tool) and, for the model, with
        # which weight version; rollout dumps carry them (train/rollout_dump.py)
        turns = [{"source": "model", "start": 0, "end": len(ids), "weight_version": s.weight_version}]
        while s.finish_reason == "stop" and stats["turns"] < self.cfg.max_turns:
            call = self.format.parse(self.tokenizer.decode(last_turn), self.tool_args)
            if call is None:
                break  # the model answered (EOS) without a call
            outcome = await self._run(call)
            stats["tool_calls"] += 1
            stats["tool_errors"] += outcome.status == "error"
            stats["tool_timeouts"] += outcome.status == "timeout"
            stats["tool_s"] += outcome.seconds
            tool_ids = self.renderer.ids(outcome.text)
            room = params.max_tokens - len(ids)
            if len(tool_ids) >= room:  # nothing left to generate after it: cut it to fit and stop
                tool_ids, s.finish_reason = tool_ids[:room], "length"
            ids += tool_ids
            versions += versions[-1:] * len(tool_ids) if versions else [version] * len(tool_ids)
            logprobs += [0.0] * len(tool_ids)
            mask += [0] * len(tool_ids)
            turns.append({"source": "tool", "start": len(ids) - len(tool_ids), "end": len(ids), "tool": call.name,
                          "status": outcome.status})
            if s.finish_reason == "length":
                break
            turn = Sample(prompt_ids=list(s.prompt_ids) + ids, group_id=s.group_id, index=s.index)
            seed = None if params.seed is None else hash((params.seed, s.index, stats["turns"])) % (2 ** 31)
            await fleet.generate_group([turn], dataclasses.replace(params, max_tokens=room - len(tool_ids),
                                                                   seed=seed))
            stats["turns"] += 1
            last_turn = list(turn.response_ids)
            ids += last_turn
            versions += turn.token_versions()
            logprobs += list(turn.rollout_logprobs)
            mask += [1] * len(last_turn)
            turns.append({"source": "model", "start": len(ids) - len(last_turn), "end": len(ids),
                          "weight_version": turn.weight_version})
            version = min(version, turn.weight_version)
            s.finish_reason = turn.finish_reason
        s.response_ids, s.rollout_logprobs, s.loss_mask, s.weight_version = ids, logprobs, mask, version
        s.weight_versions = versions if len(set(versions)) > 1 else None
        if stats["turns"] > 1 or stats["tool_calls"]:
            s.response_text = self.tokenizer.decode(ids, skip_special_tokens=True)  # for the verifier only
        s.metadata["multi_turn"] = stats
        s.metadata["turns"] = turns

    async def _run(self, call) -> ToolOutcome:
        if call.error:
            return ToolOutcome(f"Error: {call.error}"[:self.limits.max_output_chars], "error", 0.0)
        spec = self.specs.get(call.name)
        if spec is None:
            return ToolOutcome(f"Error: unknown tool {call.name!r}; available: {', '.join(self.specs)}"
                               [:self.limits.max_output_chars], "error", 0.0)
        return await arun_tool(spec, call.args, self.limits, self.executor)


def multi_turn_metrics(samples: list) -> dict:
    """Means over responses of their turns and tool calls; fractions of calls that failed or timed out; fraction of
    responses that called a tool; `time/tool_s`: summed time inside tools (across samples running in parallel)."""
    stats = [s.metadata.get("multi_turn") for s in samples]
    stats = [x for x in stats if x is not None]
    n, calls = max(len(stats), 1), sum(x["tool_calls"] for x in stats)
    return {
        "rollout/turns_mean": sum(x["turns"] for x in stats) / n,
        "rollout/tool_calls_mean": calls / n,
        "rollout/tool_error_frac": sum(x["tool_errors"] for x in stats) / max(calls, 1),
        "rollout/tool_timeout_frac": sum(x["tool_timeouts"] for x in stats) / max(calls, 1),
        "rollout/tool_using_frac": sum(x["tool_calls"] > 0 for x in stats) / n,
        "time/tool_s": sum(x["tool_s"] for x in stats),
    }
