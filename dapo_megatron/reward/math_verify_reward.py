"""`\\boxed{}` extraction plus symbolic equivalence through the `math-verify` package.

Named `math_verify_reward` so that it never shadows the `math_verify` package it wraps.
Only an explicit final answer is graded (the last `\\boxed{...}`, else the last `Answer:` line);
a response with neither scores wrong rather than letting the parser pick any stray number.
"""
import re
from typing import Optional

from dapo_megatron.reward.extract import last_answer_line, last_boxed_content
from dapo_megatron.reward.math_dapo import TAIL_CHARS, normalize_answer
from dapo_megatron.reward.registry import register_verifier
from dapo_megatron.reward.symbolic import symbolic_match

def final_answer(response: str) -> Optional[str]:
    boxed = last_boxed_content(response)
    if boxed is not None:
        return boxed
    line = last_answer_line(response[-TAIL_CHARS:])
    if line is None:
        return None
    inline = re.search(r"\$(.+?)\$", line)  # `Answer: the value is $x$`: grade the math, not the prose
    return (inline.group(1) if inline else line.replace("$", "")).strip()


@register_verifier("math_verify", preload=("math_verify",), warm_up=("\\boxed{\\frac{1}{2}}", "0.5"))
def verify(response: str, ground_truth: str) -> bool:
    pred = final_answer(response)
    if not pred:
        return False
    truth = str(ground_truth)
    if normalize_answer(pred, split_equation=False) == normalize_answer(truth, split_equation=False):
        return True  # identical after normalisation: no need for sympy
    return symbolic_match(pred, truth)
