"""Cheap, sound reasons why two normalised answers cannot be equal, tried before math-verify (sympy).

math-verify costs ~10-100 ms per pair; most wrong answers differ in kind (a number vs a tuple, a word vs a number)
or in value (numbers that evaluate differently). `surely_different` says True only when equality is impossible:
  * the shapes differ: the number of values (top-level commas, `\\pm`), the enclosing brackets of a tuple or
    interval, or the structure tokens present (`\\cup`, `\\infty`, `[`, a subscript such as a base `52_8`, a
    matrix, a set `\\{...\\}`, `=`, inequalities);
  * one is a base numeral (`2516_8`) and the strings differ;
  * the free letters differ (`15x - 80` vs `-2y`; a word such as `even` vs a number), LaTeX commands aside;
  * both evaluate as plain arithmetic (digits, + - * / ^, \\frac, \\sqrt, \\pi, \\cdot, \\times, parentheses, with
    each letter set to a fixed irrational value) and the values differ by more than 1e-6 relative.
Anything else (including values that agree) goes to math-verify, which decides.
"""
import math
import re
from typing import Optional

_COMMAND_RE = re.compile(r"\\[a-zA-Z]+")
_OPEN, _CLOSE = "([{", ")]}"
_LETTER_VALUES = {}  # letter -> a fixed value no simple expression of others hits by accident


def _letter_value(ch: str) -> float:
    if ch not in _LETTER_VALUES:
        _LETTER_VALUES[ch] = 0.5 + math.e * math.sqrt(ord(ch)) / 10.0  # x = 3.4776...: irrational-looking
    return _LETTER_VALUES[ch]


_STRUCTURE = ("\\cup", "\\cap", "\\infty", "\\{", "[", "]", "_", "\\begin", "\\in", "=", "<", ">", "\\le", "\\ge")


def _shape(ans: str) -> tuple:
    """(number of values, enclosing bracket pair or '', structural tokens present) of a normalised answer.

    `1 \\pm \\sqrt{19}` counts as two values, like `1+\\sqrt{19}, 1-\\sqrt{19}`.
    """
    depth, commas = 0, 0
    closes_at_end = False
    for i, ch in enumerate(ans):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth == 0 and i == len(ans) - 1:
                closes_at_end = True
            elif depth == 0:
                closes_at_end = False
        elif ch == "," and depth == 0:
            commas += 1
    wrapped = ""
    if ans[:1] in "([" and ans[-1:] in ")]" and closes_at_end and _first_group_ends_at_end(ans) and "," in ans:
        wrapped = ans[0] + ans[-1]
    values = (commas + 1) * (2 if "\\pm" in ans and not wrapped else 1)
    return values, wrapped, frozenset(t for t in _STRUCTURE if t in ans)


def _first_group_ends_at_end(ans: str) -> bool:
    depth = 0
    for i, ch in enumerate(ans):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth == 0:
                return i == len(ans) - 1
    return False


def _letters(ans: str) -> frozenset:
    return frozenset(ch for ch in _COMMAND_RE.sub(" ", ans) if ch.isalpha())


_EVAL_CHARS = re.compile(r"[0-9.+\-*/()a-zA-Z ]*")


def evaluate(ans: str) -> Optional[float]:
    """The value of plain arithmetic LaTeX (letters at fixed values), else None."""
    s = ans.replace("\\left", "").replace("\\right", "").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("\\pi", "(P)")
    for _ in range(8):  # innermost \frac{..}{..} and \sqrt{..} first
        t = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        t = re.sub(r"\\sqrt\{([^{}]*)\}", r"((\1)**0.5)", t)
        if t == s:
            break
        s = t
    if "\\" in s:
        return None  # a command we do not evaluate (\\infty, \\pm, \\cup, ...)
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if not _EVAL_CHARS.fullmatch(s):
        return None
    s = re.sub(r"\d+\.?\d*|\.\d+", lambda m: repr(float(m.group())), s)  # floats: 9^9^9 overflows, never hangs
    # implicit multiplication: 2x, 2(, )(, x(, )x, xy
    s = re.sub(r"(?<=[\d)a-zA-Z])(?=[(a-zA-Z])", "*", s)
    s = re.sub(r"(?<=[)a-zA-Z])(?=\d)", "*", s)
    names = {ch: _letter_value(ch) for ch in set(s) if ch.isalpha() and ch != "P"}
    names["P"] = math.pi
    try:
        value = eval(s, {"__builtins__": {}}, names)  # noqa: S307 - charset checked above: digits, ops, names
        value = complex(value)
    except Exception:
        return None
    if value.imag != 0 or not math.isfinite(value.real):
        return None
    return value.real


_BASE_NUMERAL_RE = re.compile(r"\d+_\{?\d+\}?")  # 2516_8: the digits in that base are the answer


_MATRIX_RE = re.compile(r"\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}")


def _matrix_cells(ans: str) -> Optional[list]:
    m = _MATRIX_RE.fullmatch(ans)
    return [row.split("&") for row in m.group(2).split("\\\\")] if m else None


def surely_different(a: str, b: str) -> bool:
    ma, mb = _matrix_cells(a), _matrix_cells(b)
    if ma is not None and mb is not None:  # same layout, then cell by cell
        if [len(r) for r in ma] != [len(r) for r in mb]:
            return True
        return any(surely_different(x, y) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    if a != b and (_BASE_NUMERAL_RE.fullmatch(a) or _BASE_NUMERAL_RE.fullmatch(b)):
        return True
    if _shape(a) != _shape(b) or _letters(a) != _letters(b):
        return True
    va, vb = evaluate(a), evaluate(b)
    return va is not None and vb is not None and abs(va - vb) > 1e-6 * max(1.0, abs(va), abs(vb))
