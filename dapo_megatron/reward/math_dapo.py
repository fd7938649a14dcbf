"""The DAPO reward rule: the last `Answer:` line, Minerva-style normalisation, exact string match.

Same semantics as DAPO's `math_dapo` scorer (only the tail of the response is read, so an answer
must sit on the last lines), plus a few normalisations DAPO lacks (`\\dfrac`, `\\left`, `%`, numeric
equality of plain decimals such as `18.00` vs `18`) and, when the tail has no `Answer:`, a fallback
to the last `\\boxed{...}` of the whole response (a long box may start before the tail).
"""
import re
from typing import Optional

from dapo_megatron.reward.extract import last_answer_line, last_boxed_content

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


def normalize_answer(answer: str, split_equation: bool = True) -> str:
    """Canonical string form of a final answer (applied to prediction and ground truth alike).

    `split_equation` keeps only the right-hand side of `=` as Minerva does (`x = 5` -> `5`).
    """
    ans = answer.strip()
    boxed = last_boxed_content(ans)
    if boxed is not None:
        ans = boxed
    ans = ans.replace("\\$", "")  # currency, not math mode
    inline = re.search(r"\$(.*?)\$", ans)
    if inline:  # keep the first inline-math segment and drop the prose around it
        ans = inline.group(1)
    ans = ans.replace("$", "")
    if split_equation:
        ans = ans.split("=")[-1]
    ans = _TEXT_AND_RE.sub(",", ans)
    ans = _TEXT_WRAP_RE.sub(r"\1", ans)
    ans = ans.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _SPACING:
        ans = ans.replace(token, "")
    ans = _SIZING_RE.sub("", ans)
    ans = _DEGREE_RE.sub("", ans).replace("\\%", "").replace("%", "")
    ans = _UNIT_RE.sub("", ans)
    ans = re.sub(r"\s+", "", ans).strip("*").rstrip(".")
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


def answers_match(pred: str, truth: str) -> bool:
    a, b = normalize_answer(pred), normalize_answer(truth)
    if a == b:
        return bool(a)
    if _DECIMAL_RE.fullmatch(a) and _DECIMAL_RE.fullmatch(b):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return False


def verify(response: str, ground_truth: str) -> bool:
    """True iff the response's final answer equals the ground truth after normalisation."""
    pred = extract_prediction(response)
    return pred is not None and answers_match(pred, str(ground_truth))
