"""Prompt datasets from JSONL or Parquet, in the DAPO-Math-17k layout or the plain {question, answer} one.

DAPO-Math-17k layout: `prompt` is a chat message list whose content already carries the instruction
template, the label is `reward_model.ground_truth`, plus `data_source` and `extra_info`.
Plain layout: `question` and `answer` (the files in shared/data); the question goes through `template`.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from dapo_megatron.data.sampler import EpochSampler
from dapo_megatron.data.templates import format_question, render_messages

logger = logging.getLogger(__name__)

LAYOUT_KEYS = {"dapo": ("prompt", "reward_model.ground_truth"), "plain": ("question", "answer")}


class DataError(ValueError):
    """A dataset file that cannot be used as-is; the message names the file, the row and the field."""


@dataclass
class PromptItem:
    prompt_ids: list[int]
    prompt_text: str
    label: str
    data_source: str = ""
    metadata: dict = field(default_factory=dict)


def read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs; location is `line N` (JSONL) or `row N` (Parquet), 1-based."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
            yield f"line {i}", row


def get_field(row: dict, dotted: str) -> Any:
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def detect_layout(row: dict, where: str) -> str:
    if isinstance(row.get("prompt"), list):
        return "dapo"
    if "question" in row:
        return "plain"
    raise DataError(f"{where}: cannot tell the dataset layout: expected a 'prompt' chat list with "
                    f"'reward_model.ground_truth' (DAPO-Math-17k layout) or 'question' + 'answer'; "
                    f"found fields {sorted(row)}; convert the file with tools/prepare_data.py or rename its fields "
                    "(data.path must hold one of these two layouts)")


def check_row(row: dict, where: str, layout: str, prompt_key=None, label_key=None) -> tuple:
    """(prompt key, label key, prompt, label) of a row, or a DataError naming the row and the field."""
    p_key = prompt_key or LAYOUT_KEYS[layout][0]
    l_key = label_key or LAYOUT_KEYS[layout][1]
    prompt, label = get_field(row, p_key), get_field(row, l_key)
    if prompt is None or prompt == "" or prompt == []:
        raise DataError(f"{where}: missing field '{p_key}' ({layout} layout)")
    if label is None:
        raise DataError(f"{where}: missing field '{l_key}' ({layout} layout); every row needs the reference answer")
    if not str(label).strip():
        raise DataError(f"{where}: field '{l_key}' is empty; every row needs a non-empty reference answer")
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt)):
        raise DataError(f"{where}: field '{p_key}' must be a question string or a list of "
                        "{'role': ..., 'content': ...} messages")
    return p_key, l_key, prompt, label


def check_file(path) -> int:
    """Read and check a prompt file without tokenising it (run before any process starts); returns its row count."""
    path, layout, n = Path(path), None, 0
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    try:
        for where, row in read_rows(path):
            where = f"{path}, {where}"
            layout = layout or detect_layout(row, where)
            check_row(row, where, layout)
            n += 1
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give a JSONL or Parquet "
                        "file") from None
    except DataError:
        raise
    except Exception as e:  # pyarrow's errors for a broken parquet file
        if path.suffix != ".parquet":
            raise
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if n == 0:
        raise DataError(f"{path}: the file has no rows")
    return n


class PromptDataset:
    """Tokenised prompts with a deterministic, resumable epoch sampler (`next_batch`, `state_dict`)."""

    def __init__(self, path, tokenizer, *, prompt_key: Optional[str] = None, label_key: Optional[str] = None,
                 template: str = "dapo", apply_chat_template: bool = True,
                 max_prompt_length: Optional[int] = None, seed: int = 0, shuffle: bool = True,
                 tools: Optional[list] = None):
        self.path = Path(path)
        self.tools = tools  # function schemas the chat template lists (rollout.multi_turn, format hermes)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such dataset file")
        self.tokenizer = tokenizer
        self.template = template
        self.apply_chat_template = apply_chat_template
        format_question("", template)  # reject a bad template before reading anything
        self.items = self._load(prompt_key, label_key, max_prompt_length)
        self.sampler = EpochSampler(len(self.items), seed=seed, shuffle=shuffle)

    def _load(self, prompt_key, label_key, max_prompt_length) -> list[PromptItem]:
        items, too_long, layout = [], 0, None
        for where, row in read_rows(self.path):
            where = f"{self.path}, {where}"
            layout = layout or detect_layout(row, where)
            item = self._make_item(row, where, layout, prompt_key, label_key)
            if max_prompt_length is not None and len(item.prompt_ids) > max_prompt_length:
                too_long += 1
                continue
            item.metadata["row"] = len(items) + too_long
            items.append(item)
        if layout is None:
            raise DataError(f"{self.path}: the file has no rows")
        if too_long:
            logger.warning("%s: dropped %d of %d prompts longer than max_prompt_length=%d tokens",
                           self.path, too_long, too_long + len(items), max_prompt_length)
        if not items:
            raise DataError(f"{self.path}: every prompt is longer than max_prompt_length={max_prompt_length}")
        return items

    def _make_item(self, row, where, layout, prompt_key, label_key) -> PromptItem:
        p_key, l_key, prompt, label = check_row(row, where, layout, prompt_key, label_key)
        messages = self._messages(prompt, where, p_key)
        text, templated = render_messages(self.tokenizer, messages, self.apply_chat_template, self.tools)
        ids = list(self.tokenizer.encode(text, add_special_tokens=not templated))
        source = row.get("data_source") or self.path.stem
        return PromptItem(ids, text, str(label), str(source), self._metadata(row, layout, p_key, l_key))

    def _messages(self, prompt, where, key) -> list[dict]:
        if isinstance(prompt, str):  # a bare question: apply the instruction template
            return [{"role": "user", "content": format_question(prompt, self.template)}]
        if not isinstance(prompt, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt):
            raise DataError(f"{where}: field '{key}' must be a question string or a list of "
                            "{'role': ..., 'content': ...} messages")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]

    @staticmethod
    def _metadata(row, layout, p_key, l_key) -> dict:
        if layout == "dapo":
            extra = row.get("extra_info")
            return dict(extra) if isinstance(extra, dict) else {}
        skip = {p_key, l_key.split(".")[0], "solution"}  # solutions are long and must not leak into prompts
        return {k: v for k, v in row.items() if k not in skip}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next_batch(self, n: int) -> list[PromptItem]:
        """The next `n` prompts in (seed, epoch) order, continuing into the next epoch when one ends."""
        return [self.items[i] for i in self.sampler.next_indices(n)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
