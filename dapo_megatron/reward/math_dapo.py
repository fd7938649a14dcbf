"""The DAPO reward rule: the last `Answer:` line, Minerva-style normalisation, then symbolic equivalence.

Extraction is DAPO's (`math_dapo` in verl/DAPO): only the tail of the response is read, the last `Answer:` line
there, else the last `\\boxed{...}` of the whole response (a long box may start before the tail). DAPO then
compared the normalised strings exactly. We keep that as the first test and add, in order:
  * normalisations DAPO lacks: `\\dfrac`, `\\left`/`\\right`, `%`, Unicode math characters (minus, pi, sqrt,
    times, ...), and the Minerva `x = 5 -> 5` split only when the left side is a lone symbol (so a plane
    `5x - 7y + 11z + 4 = 0` is not reduced to `0`);
  * exact rational arithmetic when both answers are plain numbers (`18.00` = `18`, `012` = `12`, `0.25` =
    `\\frac14`, `1\\frac{4}{5}` = `9/5`); a decimal never matches a non-rational or inexact answer (`0.333` is not
    `\\frac13`, `3.14` is not `\\pi`);
  * answers that cannot be equal (different shape, free letters or numeric value: reward/prefilter.py) are
    wrong without sympy;
  * otherwise math-verify (sympy) decides equivalence (`\\pi/2` = `\\frac{\\pi}{2}`, `(3,\\pi/2)`, intervals with
    their brackets, unordered solution lists), inside the verifier process pool and its timeout;
  * hedges stay wrong: an answer naming alternatives (`3 or 5`, several `$...$` segments) never matches a
    single ground truth.
"""
import functools
import re
from fractions import Fraction
from typing import Optional

from dapo_megatron.reward.extract import last_answer_line, last_boxed_content
from dapo_megatron.reward.prefilter import surely_different
from dapo_megatron.reward.registry import register_verifier

TAIL_CHARS = 300  # the longest MATH-500 answer is 159 characters

_UNITS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "inch", "hours", "hour", "km", "units",
    "points", "feet", "foot", "minutes", "seconds", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "multiples", "days", "years", "miles",
)
_UNIT_RE = re.compile(r"\b(?:%s)\b(?:\^\{?\d\}?)?" % "|".join(_UNITS))
_TEXT_AND_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*and\s*\}")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|overline)\{([^{}]*)\}")
_SPACING = ("\\!", "\\,", "\\;", "\\:", "\\ ", "{,}")
_SIZING_RE = re.compile(r"\\(?:left|right|big|Big|bigl|bigr|displaystyle)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{?\\circ\}?|°")
_FRAC_SHORT_RE = re.compile(r"\\frac([^{\\])([^{\\])")  # \frac34 -> \frac{3}{4}
_FRAC_HALF_RE = re.compile(r"\\frac\{([^{}]*)\}([^{\\])")  # \frac{9}4 -> \frac{9}{4}
_FRAC_HALF2_RE = re.compile(r"\\frac([^{\\])\{")  # \frac9{19} -> \frac{9}{19}
_SQRT_SHORT_RE = re.compile(r"\\sqrt([^{\\])")  # \sqrt2 -> \sqrt{2}
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_DECIMAL_RE = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_MIXED_RE = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")  # 1\frac{4}{5} = 9/5
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+)")
_LONE_LHS_RE = re.compile(r"\\?[a-zA-Z]+(?:_\{?\w+\}?)?")  # x, k, \theta, a_1: the `x = 5` of Minerva's split
_INLINE_RE = re.compile(r"\$(.*?)\$")
_SPACE_RE = re.compile(r"\s+")
_COMMAND_SPACE_RE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])")
_IN_SET_RE = re.compile(r"^\s*[a-zA-Z]\s*\\in\s*")
_HEDGE_RE = re.compile(r"\bor\b|\\lor\b|\\vee\b")
_UNICODE_SQRT_RE = re.compile(r"\u221a\s*(\d+(?:\.\d+)?|[a-zA-Z]|\(([^()]*)\)|\{([^{}]*)\})")  # √19, √(x+1)
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
            "\u00f7": "/", "\u2044": "/", "\u03c0": "\\pi ", "\u221a": "\\sqrt", "\u221e": "\\infty ",
            "\u2264": "\\le ", "\u2265": "\\ge ", "\u222a": "\\cup ", "\u2229": "\\cap ", "\u2208": "\\in ",
            "\u00b2": "^2", "\u00b3": "^3", "\u00bd": "1/2", "\u00bc": "1/4", "\u00be": "3/4", "\u00a0": " ",
            "\u2009": " ", "\u202f": " ", "\u00b1": "\\pm "}


def normalize_answer(answer: str, split_equation: bool = True) -> str:
    """Canonical string form of a final answer (applied to prediction and ground truth alike).

    `split_equation` keeps only the right-hand side of `=` as Minerva does (`x = 5` -> `5`), when every left side
    is a lone symbol (`x`, `\\theta`, `a_1`).
    """
    ans = answer.strip()
    if not ans.isascii():
        ans = _UNICODE_SQRT_RE.sub(lambda m: "\\sqrt{%s}" % (m.group(2) or m.group(3) or m.group(1)), ans)
        for char, latex in _UNICODE.items():
            ans = ans.replace(char, latex)
    boxed = last_boxed_content(ans)
    if boxed is not None:
        ans = boxed
    ans = ans.replace("\\$", "")  # currency, not math mode
    inline = _INLINE_RE.findall(ans)
    if len(inline) == 1:  # keep the inline-math segment and drop the prose around it
        ans = inline[0]  # (several segments, `$3$ or $5$`, stay whole: DAPO kept the first, accepting hedges)
    ans = ans.replace("$", "")
    if split_equation:
        parts = ans.split("=")
        if all(_LONE_LHS_RE.fullmatch(p.strip()) for p in parts[:-1]):
            ans = parts[-1]
    ans = _IN_SET_RE.sub("", ans)  # `x \in [-2, 7]` -> `[-2, 7]`
    ans = _TEXT_AND_RE.sub(",", ans)
    ans = _TEXT_WRAP_RE.sub(r"\1", ans)
    ans = ans.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    ans = ans.replace("\\\\", "\1")  # a matrix row break `\\\\` is not the spacing `\\ `
    for token in _SPACING:
        ans = ans.replace(token, "")
    ans = ans.replace("\1", "\\\\")
    ans = _SIZING_RE.sub("", ans)
    ans = _DEGREE_RE.sub("", ans).replace("\\%", "").replace("%", "")
    ans = _UNIT_RE.sub("", ans)
    ans = _COMMAND_SPACE_RE.sub(r"\1\0", ans)  # `\cot x` keeps one space: `\cotx` would be another command
    ans = _SPACE_RE.sub("", ans).replace("\0", " ").strip("*").rstrip(".")
    ans = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", ans)
    ans = _FRAC_HALF_RE.sub(r"\\frac{\1}{\2}", ans)
    ans = _FRAC_HALF2_RE.sub(r"\\frac{\1}{", ans)
    ans = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", ans)
    if _THOUSANDS_RE.fullmatch(ans):
        ans = ans.replace(",", "")
    return ans


def extract_prediction(response: str) -> Optional[str]:
    """The answer text the rule grades: the last `Answer:` line of the tail, else the last box."""
    line = last_answer_line(response[-TAIL_CHARS:])
    if line is not None:
        return line
    return last_boxed_content(response)


_normalize_truth = functools.lru_cache(maxsize=4096)(normalize_answer)  # a group's G responses share one truth


def _rational(ans: str) -> Optional[Fraction]:
    """The exact value of a normalised plain number (integer, decimal, a/b, \\frac{a}{b}, mixed number), else None."""
    try:
        if _DECIMAL_RE.fullmatch(ans):
            return Fraction(ans)
        m = _MIXED_RE.fullmatch(ans)
        if m:
            whole = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
            return -whole if m.group(1) else whole
        m = _FRAC_RE.fullmatch(ans)
        if m:
            sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
            value = Fraction(int(num), int(den))
            return -value if sign else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(pred: str, truth: str, symbolic: bool = True) -> bool:
    """Equal after normalisation, or equal numbers, or (`symbolic`) equivalent by math-verify."""
    a, b = normalize_answer(pred), _normalize_truth(truth)
    if not a:
        return False
    if a == b:
        return True
    if _HEDGE_RE.search(pred) and not _HEDGE_RE.search(truth):
        return False
    ra, rb = _rational(a), _rational(b)
    if ra is not None and rb is not None:
        return ra == rb
    if (ra is not None and "." in a) or (rb is not None and "." in b):
        return False  # a decimal vs an answer that is not a plain number: a rounding, never exact
    if not symbolic or surely_different(a, b):
        return False
    from dapo_megatron.reward.symbolic import symbolic_match

    return symbolic_match(a, b)


@register_verifier("math_dapo", preload=("math_verify",), warm_up=("\\boxed{\\frac{1}{2}}", "0.5"))
def verify(response: str, ground_truth: str) -> bool:
    """True iff the response's final answer equals the ground truth (see the module docstring)."""
    pred = extract_prediction(response)
    return pred is not None and answers_match(pred, str(ground_truth))
