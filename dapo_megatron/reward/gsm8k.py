"""GSM8K rule: the number after the last `####`, else the last number in the response; numeric equality."""
import math
import re
from typing import Optional

from dapo_megatron.reward.registry import register_verifier

# A minus sign only when it is not a hyphen between words or numbers ("3-4 hours" is 4, not -4).
_NUMBER_RE = re.compile(r"(?<![\w)])(-)?\$?(\d[\d,]*(?:\.\d+)?|\.\d+)")


def _to_float(sign: Optional[str], digits: str) -> Optional[float]:
    digits = digits.replace(",", "")
    try:
        return -float(digits) if sign else float(digits)
    except ValueError:
        return None


def extract_number(text: str) -> Optional[float]:
    if "####" in text:
        found = _NUMBER_RE.search(text.rsplit("####", 1)[1])
    else:
        matches = list(_NUMBER_RE.finditer(text))
        found = matches[-1] if matches else None
    return _to_float(*found.groups()) if found else None


@register_verifier("gsm8k", warm_up=("\\boxed{\\frac{1}{2}}", "0.5"))
def verify(response: str, ground_truth: str) -> bool:
    pred = extract_number(response)
    truth = extract_number(str(ground_truth))
    if pred is None or truth is None:
        return False
    return math.isclose(pred, truth, rel_tol=1e-9, abs_tol=1e-9)
