import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_megatron.data import DAPO_TEMPLATE, DataError, PromptDataset, format_question

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO / "dapo_megatron" / "assets" / "toy_tokenizer")


class CharTokenizer:
    """No chat template: the dataset must fall back to raw text."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


def _prepare_data_main():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dapo_template_exact_text():
    assert format_question("What is 1+1?") == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 1+1?\n\n"
        "Remember to put your answer on its own line after \"Answer:\".")
    assert format_question("{x} in a set", "Q: {question}\nA:") == "Q: {x} in a set\nA:"
    assert format_question("q", "none") == "q"
    with pytest.raises(ValueError, match="template"):
        format_question("q", "no placeholder")


def test_plain_layout_with_chat_template(shared_data, tokenizer):
    ds = PromptDataset(shared_data / "gsm8k_train_500.jsonl", tokenizer, shuffle=False)
    assert len(ds) == 500
    item = ds.next_batch(1)[0]
    question = json.loads(open(shared_data / "gsm8k_train_500.jsonl").readline())["question"]
    assert item.prompt_text == f"<|im_start|>user\n{DAPO_TEMPLATE.replace('{question}', question)}<|im_end|>\n" \
                               "<|im_start|>assistant\n"
    assert item.prompt_ids == tokenizer.encode(item.prompt_text, add_special_tokens=False)
    assert item.prompt_ids[:1] == [1]  # <|im_start|>, a single special token
    assert (item.label, item.data_source) == ("72", "gsm8k_train_500")
    assert item.metadata == {"id": "gsm8k_train_0", "row": 0}  # the solution stays out


def test_raw_text_without_chat_template(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "answer": 4}])
    item = PromptDataset(path, CharTokenizer(), template="Q: {question}").next_batch(1)[0]
    assert item.prompt_text == "Q: 2+2?" and item.label == "4"
    assert item.prompt_ids == [0] + [ord(c) for c in "Q: 2+2?"]
    off = PromptDataset(path, CharTokenizer(), apply_chat_template=False, template="none").next_batch(1)[0]
    assert off.prompt_text == "2+2?"


def test_prepared_parquet_gives_the_same_prompts(shared_data, tokenizer, tmp_path):
    prepare = _prepare_data_main()
    out = tmp_path / "gsm8k.parquet"
    prepare(["--input", str(shared_data / "gsm8k_train_500.jsonl"), "--output", str(out), "--limit", "50"])
    dapo = PromptDataset(out, tokenizer, shuffle=False)
    plain = PromptDataset(shared_data / "gsm8k_train_500.jsonl", tokenizer, shuffle=False)
    a, b = dapo.next_batch(50), plain.next_batch(50)
    assert [x.prompt_ids for x in a] == [x.prompt_ids for x in b]
    assert [x.label for x in a] == [x.label for x in b]
    assert a[3].data_source == "gsm8k_train_500" and a[3].metadata["id"] == "gsm8k_train_3"
    assert a[3].metadata["index"] == 3


def test_prepare_data_jsonl_layout(shared_data, tmp_path):
    out = tmp_path / "m.jsonl"
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", str(shared_data / "math500.jsonl"),
           "--output", str(out), "--data-source", "math"]
    assert "wrote 500 rows" in subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.open()]
    assert len(rows) == 500
    assert set(rows[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": "\\left( 3, \\frac{\\pi}{2} \\right)"}
    assert rows[0]["prompt"][0]["role"] == "user" and "solution" not in rows[0]["extra_info"]


def _ids(batch):
    return [it.metadata["row"] for it in batch]


def test_deterministic_shuffle_and_epochs(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": i} for i in range(10)])
    tok = CharTokenizer()
    a, b = PromptDataset(path, tok, seed=3), PromptDataset(path, tok, seed=3)
    first = _ids(a.next_batch(25))
    assert first == _ids(b.next_batch(25))
    assert sorted(first[:10]) == sorted(first[10:20]) == list(range(10))  # each epoch is a permutation
    assert first[:10] != first[10:20] and a.epoch == 2
    assert _ids(PromptDataset(path, tok, seed=4).next_batch(10)) != first[:10]
    assert _ids(PromptDataset(path, tok, shuffle=False).next_batch(12)) == list(range(10)) + [0, 1]


def test_resume_gives_identical_prompts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": i} for i in range(10)])
    tok = CharTokenizer()
    run = PromptDataset(path, tok, seed=7)
    run.next_batch(13)
    state = json.loads(json.dumps(run.state_dict()))
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = PromptDataset(path, tok, seed=7)
    resumed.load_state_dict(state)
    assert _ids(resumed.next_batch(12)) == _ids(run.next_batch(12))
    other = PromptDataset(_write_jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": 1}]), tok)
    with pytest.raises(ValueError, match="same data file"):
        other.load_state_dict(state)


def test_overlong_prompts_dropped_with_count(tmp_path, caplog):
    rows = [{"question": "x" * n, "answer": 1} for n in (5, 50, 8, 80)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset(path, CharTokenizer(), template="none", max_prompt_length=20, shuffle=False)
    assert len(ds) == 2 and _ids(ds.next_batch(2)) == [0, 2]
    assert "dropped 2 of 4 prompts longer than max_prompt_length=20" in caplog.text
    with pytest.raises(DataError, match="every prompt is longer"):
        PromptDataset(path, CharTokenizer(), template="none", max_prompt_length=1)


@pytest.mark.parametrize("content,match", [
    ('{"question": "a", "answer": 1}\n{"question": "b"}\n', r"d\.jsonl, line 2: missing field 'answer'"),
    ('{"prompt": [{"role": "user", "content": "a"}], "reward_model": {}}\n',
     r"line 1: missing field 'reward_model.ground_truth'"),
    ('{"prompt": "nope", "reward_model": {"ground_truth": "1"}}\n', r"line 1: cannot tell the dataset layout"),
    ('{"text": "a"}\n', r"cannot tell the dataset layout.*found fields \['text'\]"),
    ('{"question": "a", "answer": 1}\n{bad json\n', r"line 2: not valid JSON"),
    ('\n\n', "has no rows"),
    ('{"prompt": [{"content": "a"}], "reward_model": {"ground_truth": "1"}}\n', r"line 1: field 'prompt' must be"),
    ('{"question": "a", "answer": "1"}\n{"question": "b", "answer": ""}\n', r"line 2: field 'answer' is empty"),
    ('{"question": "a", "answer": "  "}\n', r"line 1: field 'answer' is empty"),
    ('{"prompt": [{"role": "user", "content": "a"}], "reward_model": {"ground_truth": ""}}\n',
     r"line 1: field 'reward_model.ground_truth' is empty"),
])
def test_bad_data_errors_name_file_line_field(tmp_path, content, match):
    from dapo_megatron.data.dataset import check_file

    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        PromptDataset(path, CharTokenizer())
    with pytest.raises(DataError, match=match):  # the pre-launch check (no tokenizer) finds the same first bad line
        check_file(path)


def test_layout_hint_names_real_options(tmp_path):
    from dapo_megatron.data.dataset import check_file

    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "a", "solution": "1"}])
    with pytest.raises(DataError) as e:
        check_file(path)
    assert "prompt_key" not in str(e.value) and "label_key" not in str(e.value)
    assert "tools/prepare_data.py" in str(e.value) and (REPO / "tools" / "prepare_data.py").is_file()
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        check_file(tmp_path / "bin.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        check_file(tmp_path / "bad.parquet")


def test_bad_parquet_row_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": "1"}, {"question": "b", "answer": None}]), path)
    with pytest.raises(DataError, match=r"d\.parquet, row 2: missing field 'answer'"):
        PromptDataset(path, CharTokenizer())
    from dapo_megatron.data.dataset import check_file

    with pytest.raises(DataError, match=r"d\.parquet, row 2: missing field 'answer'"):
        check_file(path)
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "solution": "1"}]), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols\.parquet, row 1: cannot tell the dataset layout"):
        check_file(tmp_path / "cols.parquet")
    with pytest.raises(DataError, match="no such dataset file"):
        PromptDataset(tmp_path / "missing.jsonl", CharTokenizer())
