"""`\\boxed{}` extraction plus symbolic equivalence through the `math-verify` package.

Named `math_verify_reward` so that it never shadows the `math_verify` package it wraps.
Only an explicit final answer is graded (the last `\\boxed{...}`, else the last `Answer:` line);
a response with neither scores wrong rather than letting the parser pick any stray number.
"""
import re
import threading
from typing import Optional

from dapo_megatron.reward.extract import last_answer_line, last_boxed_content
from dapo_megatron.reward.math_dapo import TAIL_CHARS, normalize_answer

_PACKAGE_TIMEOUT_S = 5  # math-verify's own signal.alarm guard; the process pool enforces the real limit


def _parse_boxed(content: str, timeout: Optional[int]):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return parse("\\boxed{" + content + "}", extraction_config=config, parsing_timeout=timeout)


def final_answer(response: str) -> Optional[str]:
    boxed = last_boxed_content(response)
    if boxed is not None:
        return boxed
    line = last_answer_line(response[-TAIL_CHARS:])
    if line is None:
        return None
    inline = re.search(r"\$(.+?)\$", line)  # `Answer: the value is $x$`: grade the math, not the prose
    return (inline.group(1) if inline else line.replace("$", "")).strip()


def symbolic_match(pred: str, truth: str) -> bool:
    """Equivalence of two LaTeX answers by math-verify (sympy): fractions, intervals, sets, degrees, pi."""
    from math_verify import verify as math_verify_equal

    # signal.alarm only works on the main thread; elsewhere the caller (the pool) owns the timeout.
    timeout = _PACKAGE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = _parse_boxed(truth, timeout)
    target = _parse_boxed(pred, timeout)
    if not gold or not target:
        return False
    return bool(math_verify_equal(gold, target, timeout_seconds=timeout))


def verify(response: str, ground_truth: str) -> bool:
    pred = final_answer(response)
    if not pred:
        return False
    truth = str(ground_truth)
    if normalize_answer(pred, split_equation=False) == normalize_answer(truth, split_equation=False):
        return True  # identical after normalisation: no need for sympy
    return symbolic_match(pred, truth)
