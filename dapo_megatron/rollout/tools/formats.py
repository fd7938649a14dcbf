"""How a model writes a tool call, and where generation stops for it (`rollout.multi_turn.format`).

- `hermes`: Qwen2.5 / Hermes JSON, `<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>`;
  the result comes back as a `tool` message rendered by the model's chat template (rollout/multi_turn.py).
- `fenced`: a fenced code block named by the tool, for base models without a chat template:
  "```python\\nprint(3*4)\\n```\\n"; the result comes back as "```output\\n12\\n```\\n".
Generation stops at the call's closing marker (a stop string); the engine's sampled ids up to and including the
token that completed it are kept as they are.
"""
import json
import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: dict
    error: str = ""  # set when the call was malformed: the message goes back to the model, no tool runs


class HermesFormat:
    name = "hermes"
    stop = ("</tool_call>",)
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)

    def parse(self, text: str, tool_args: dict) -> Optional[ToolCall]:
        """The last complete call in one turn's text, or None when the turn made no call."""
        found = self._CALL.findall(text)
        if not found:
            return None
        try:
            call = json.loads(found[-1].strip())
        except json.JSONDecodeError as e:
            return ToolCall("", {}, f"malformed tool call: not JSON ({e.msg})")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ToolCall("", {}, 'malformed tool call: expected {"name": ..., "arguments": {...}}')
        args = call.get("arguments", {})
        if isinstance(args, str):  # some templates double-encode the arguments
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return ToolCall(call["name"], {}, "malformed tool call: arguments are not a JSON object")
        if not isinstance(args, dict):
            return ToolCall(call["name"], {}, "malformed tool call: arguments are not a JSON object")
        return ToolCall(call["name"], args)


class FencedFormat:
    name = "fenced"
    stop = ("\n```\n",)
    _CALL = re.compile(r"```([A-Za-z_][\w.-]*)\n(.*?)\n```\n", re.S)

    def parse(self, text: str, tool_args: dict) -> Optional[ToolCall]:
        found = self._CALL.findall(text)
        if not found:
            return None
        name, body = found[-1]
        if name not in tool_args:
            return ToolCall(name, {}, f"unknown tool {name!r}")
        return ToolCall(name, {tool_args[name]: body})

    @staticmethod
    def render(result: str) -> str:
        return f"```output\n{result}\n```\n"


FORMATS = {f.name: f for f in (HermesFormat, FencedFormat)}
