"""Symbolic equivalence of two LaTeX answers through the `math-verify` package (sympy).

Its own module so that both verifiers use it without importing each other (`math_dapo` falls back to it when the
normalised strings differ; `math_verify_reward` grades with it).
"""
import threading
from typing import Optional

_PACKAGE_TIMEOUT_S = 5  # math-verify's own signal.alarm guard; the process pool enforces the real limit


def _parse_boxed(content: str, timeout: Optional[int]):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return parse("\\boxed{" + content + "}", extraction_config=config, parsing_timeout=timeout)


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
