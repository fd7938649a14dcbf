"""Turn {question, answer} JSONL files (../shared/data) into training files in the DAPO-Math-17k layout.

    python tools/prepare_data.py --input ../shared/data/gsm8k_train_500.jsonl --output data/gsm8k.parquet

Each row becomes {data_source, prompt: [{role: user, content: <template(question)>}], ability,
reward_model: {style: rule, ground_truth: answer}, extra_info: {index, id, ...}}, the layout
`PromptDataset` and verl read. `--layout plain` writes {question, answer, ...} instead (e.g. to turn
JSONL into Parquet unchanged). The output format follows the suffix: .parquet or .jsonl.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dapo_megatron.data.dataset import DataError, read_rows  # noqa: E402
from dapo_megatron.data.templates import format_question  # noqa: E402

_NOT_EXTRA = ("question", "answer", "solution")  # solutions stay out of training files


def to_dapo_row(row: dict, index: int, data_source: str, template: str) -> dict:
    extra = {"index": index, **{k: v for k, v in row.items() if k not in _NOT_EXTRA}}
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": format_question(row["question"], template)}],
        "ability": "MATH",
        "reward_model": {"style": "rule", "ground_truth": str(row["answer"])},
        "extra_info": extra,
    }


def convert(input_path: Path, layout: str, template: str, data_source: str, limit=None) -> list[dict]:
    rows = []
    for where, row in read_rows(input_path):
        if limit is not None and len(rows) >= limit:
            break
        for key in ("question", "answer"):
            if key not in row:
                raise DataError(f"{input_path}, {where}: missing field '{key}' (expected the plain "
                                "{question, answer} layout)")
        rows.append(to_dapo_row(row, len(rows), data_source, template) if layout == "dapo" else row)
    if not rows:
        raise DataError(f"{input_path}: the file has no rows")
    return rows


def write_rows(rows: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), output)
    elif output.suffix == ".jsonl":
        with open(output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise SystemExit(f"--output {output}: use a .parquet or .jsonl file name")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="JSONL/Parquet with question and answer fields")
    p.add_argument("--output", required=True, type=Path, help="output .parquet or .jsonl")
    p.add_argument("--layout", choices=("dapo", "plain"), default="dapo")
    p.add_argument("--template", default="dapo", help="dapo | none | a format string with {question}")
    p.add_argument("--data-source", default=None,
                   help="data_source column (default: the input file name, e.g. gsm8k_train_500)")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N rows")
    args = p.parse_args(argv)
    rows = convert(args.input, args.layout, args.template, args.data_source or args.input.stem, args.limit)
    write_rows(rows, args.output)
    print(f"wrote {len(rows)} rows ({args.layout} layout) to {args.output}")


if __name__ == "__main__":
    main()
