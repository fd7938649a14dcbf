"""Verifiers on hand-made tricky cases and on every reference answer in shared/data."""
import json

import pytest

from dapo_megatron.reward import get_verifier
from dapo_megatron.reward import gsm8k, math_dapo, math_verify_reward
from dapo_megatron.reward.extract import last_answer_line, last_boxed_content
from dapo_megatron.reward.math_dapo import normalize_answer


def _rows(shared_data, name):
    return [json.loads(line) for line in open(shared_data / name, encoding="utf-8")]


def test_last_boxed_nested_and_truncated():
    assert last_boxed_content(r"\boxed{1} then \boxed{\frac{a^{2}}{b}}.") == r"\frac{a^{2}}{b}"
    assert last_boxed_content(r"\boxed{\boxed{7}}") == "7"  # innermost-last box wins
    assert last_boxed_content(r"so \boxed 5.") == "5"
    assert last_boxed_content(r"\fbox{12}") == "12"
    assert last_boxed_content(r"cut off \boxed{\frac{1}{2") is None
    assert last_boxed_content("no box") is None
    assert last_answer_line("answer: 3\nFinal ANSWER :  $4$ \nthanks") == "$4$"


@pytest.mark.parametrize("raw,norm", [
    (r"\dfrac{1}{2}", r"\frac{1}{2}"), (r"\tfrac12", r"\frac{1}{2}"), (r"\frac 34", r"\frac{3}{4}"),
    ("1,000", "1000"), ("-1,234.5", "-1234.5"), (r"1{,}000", "1000"), (r"10,\!080", "10080"),
    (r"\$32,\!348", "32348"), (r"x = -5.", "-5"), (r"90^\circ", "90"), (r"5.4 \text{ cents}", "5.4"),
    (r"15\mbox{ cm}^2", "15"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), (r"\text{(B)}", "(B)"),
    (r"The answer is $\boxed{\sqrt2}$.", r"\sqrt{2}"), ("25\\%", "25"), ("1,2,3", "1,2,3"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("response,truth,ok", [
    ("Work...\nAnswer: 1,000", "1000", True),
    ("Work...\nanswer:  $-7$.", "-7", True),
    ("Work...\nAnswer: 7", "-7", False),
    ("Work...\nAnswer: \\dfrac{3}{4}", "\\frac{3}{4}", True),
    ("Work...\nAnswer: 0.75", "\\frac{3}{4}", True),  # exact rational equality (DAPO's string match said no)
    ("Work...\nAnswer: 0.33", "\\frac{1}{3}", False),  # a rounding is not the exact fraction
    ("Work...\nAnswer: 18.00", "18", True),
    ("**Answer:** 42", "42", True),
    ("Answer: 3 at first, but then... Answer: 5", "5", True),
    ("Thus \\boxed{\\boxed{12}}", "12", True),  # no Answer: line -> last box
    ("Thus \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", True),
    ("Answer: (-\\infty, 2) \\cup (3, \\infty)", "(-\\infty, 2) \\cup (3, \\infty)", True),
    ("Answer: (-\\infty, 2] \\cup (3, \\infty)", "(-\\infty, 2) \\cup (3, \\infty)", False),
    ("I do not know.", "5", False),
    ("Answer: ", "5", False),
    ("Answer: 5\n" + "padding " * 100, "5", False),  # the rule only reads the last 300 characters
])
def test_math_dapo(response, truth, ok):
    assert math_dapo.verify(response, truth) is ok


@pytest.mark.parametrize("response,truth,ok", [
    ("so $\\boxed{0.5}$", "\\frac{1}{2}", True),
    ("so $\\boxed{\\dfrac{3}{4}}$", "\\frac34", True),
    ("\\boxed{[-2, 7]}", "x \\in [-2,7]", True),
    ("\\boxed{(-\\infty,0)}", "(-\\infty, 0]", False),
    ("\\boxed{\\{-2, 1\\pm\\sqrt5\\}}", "\\{1\\pm\\sqrt{5},-2\\}", True),
    ("\\boxed{106}", "106^\\circ", True),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),
    ("\\boxed{3.14159}", "\\pi", False),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{-3}", "3", False),
    ("\\boxed{5}\nAnswer: 5", "5", True),
    ("earlier \\boxed{4}, finally \\boxed{\\boxed{6}}", "6", True),
    ("Answer: the value is $\\frac{1}{2}$.", "0.5", True),
    ("\\boxed{x=0}", "5x - 7y + 11z + 4 = 0", False),  # no Minerva `=` split on this path
    ("the answer is 5", "5", False),  # no box and no Answer: line
])
def test_math_verify(response, truth, ok):
    assert math_verify_reward.verify(response, truth) is ok


@pytest.mark.parametrize("response,truth,ok", [
    ("3 + 4 = 7\n#### 7", "7", True), ("#### 1,000", "1000", True), ("so it is $1,450,000.", "1,450,000", True),
    ("The change is -3 degrees", "-3", True), ("between 3-4 hours", "-4", False), ("Answer: 18.00", "18", True),
    ("#### 72\nthen 5", "72", True), ("no number", "3", False), ("it is 8", "9", False),
])
def test_gsm8k(response, truth, ok):
    assert gsm8k.verify(response, truth) is ok


def test_registry():
    assert get_verifier("gsm8k") is gsm8k.verify
    assert get_verifier("python:dapo_megatron.reward.math_dapo.verify") is math_dapo.verify
    with pytest.raises(ValueError, match="unknown"):
        get_verifier("rouge")
    with pytest.raises(ValueError, match="cannot import"):
        get_verifier("python:no_such_module_xyz.check")
    with pytest.raises(ValueError, match="no function"):
        get_verifier("python:dapo_megatron.reward.math_dapo.nope")


def _formats(answer):
    return [f"Let me work it out.\nStep 1 gives 3 and 4.\nAnswer: {answer}",
            f"We are done.\n\nAnswer: ${answer}$",
            f"Putting it together, the final answer is $\\boxed{{{answer}}}$. Hope this helps!"]


@pytest.mark.parametrize("name", ["gsm8k_test.jsonl", "gsm8k_train_500.jsonl"])
def test_every_gsm8k_reference_answer_scores_correct(shared_data, name):
    rows = _rows(shared_data, name)
    assert len(rows) in (500, 1319)
    bad = [(r["id"], resp) for r in rows for resp in _formats(r["answer"]) + [r["solution"]]
           if not gsm8k.verify(resp, r["answer"])]
    bad += [(r["id"], resp) for r in rows for resp in _formats(r["answer"]) if not math_dapo.verify(resp, r["answer"])]
    assert not bad, bad[:5]
    # ...and a wrong answer (reference + 1) scores wrong for every row.
    wrong = [r["id"] for r in rows if gsm8k.verify(f"#### {float(r['answer'].replace(',', '')) + 1}", r["answer"])]
    assert not wrong


def test_every_math500_reference_answer_scores_correct(shared_data):
    rows = _rows(shared_data, "math500.jsonl")
    assert len(rows) == 500
    bad = [(r["id"], resp) for r in rows for resp in _formats(r["answer"]) if not math_dapo.verify(resp, r["answer"])]
    boxed = ["so the answer is $\\boxed{%s}$.", "\\boxed{%s}\n\nDone."]
    bad += [(r["id"], fmt) for r in rows for fmt in boxed
            if not math_verify_reward.verify(fmt % r["answer"], r["answer"])]
    assert not bad, bad[:5]


def test_every_math500_answer_is_symbolically_equal_to_itself(shared_data):
    # verify() short-cuts identical strings; check that sympy round-trips every answer as well.
    rows = _rows(shared_data, "math500.jsonl")
    bad = [r["answer"] for r in rows if not math_verify_reward.symbolic_match(r["answer"], r["answer"])]
    assert not bad, bad


def test_math500_wrong_answers_score_wrong(shared_data):
    rows = _rows(shared_data, "math500.jsonl")
    # Pair each answer with the next row's (different) answer: must not match under math_dapo.
    pairs = [(a["answer"], b["answer"]) for a, b in zip(rows, rows[1:]) if normalize_answer(a["answer"]) !=
             normalize_answer(b["answer"])]
    assert len(pairs) > 450
    assert not [p for p in pairs if math_dapo.verify(f"Answer: {p[0]}", p[1])]
    assert not [p for p in pairs[:100] if math_verify_reward.verify(f"\\boxed{{{p[0]}}}", p[1])]
