"""Hugging Face safetensors folder -> Megatron dist checkpoint (loads at any TP/PP).

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --save-dir ckpt/qwen2.5-7b [--dtype bf16]
Same as `dapo-megatron convert hf-to-megatron ...`; see dapo_megatron/models/convert.py.
"""
import sys

from dapo_megatron.cli import main

if __name__ == "__main__":
    main(["convert", "hf-to-megatron", *sys.argv[1:]])  # the CLI's one-line errors: dapo-megatron convert: ...
