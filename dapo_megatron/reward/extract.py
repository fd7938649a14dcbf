"""Answer extraction shared by the verifiers: the last `\\boxed{...}` and the last `Answer:` line."""
import re
from typing import Optional

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_TAG = re.compile(r"answer\s*:", re.IGNORECASE)


def last_boxed_content(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), nested braces included.

    Returns None when there is no box or its braces never close (a truncated response).
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + 1
    while i < len(text) and text[i].isalpha():
        i += 1  # skip the command name
    if text.startswith(" ", i):  # `\boxed 5`: the argument is the next space-free word
        word = text[i + 1:].split(maxsplit=1)
        return word[0].rstrip("$.") if word else None
    if not text.startswith("{", i):
        return None
    return _brace_group(text, i)


def _brace_group(text: str, open_idx: int) -> Optional[str]:
    depth = 0
    for j in range(open_idx, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1:j]
    return None


def last_answer_line(text: str) -> Optional[str]:
    r"""The rest of the line after the last `Answer:` (case-insensitive), stripped; None if absent.

    Like DAPO's `Answer\s*:\s*([^\n]+)`, an answer on the line below a bare `Answer:` counts.
    """
    tags = list(_ANSWER_TAG.finditer(text))
    if not tags:
        return None
    rest = text[tags[-1].end():].lstrip()
    return rest.split("\n", 1)[0].strip() or None
