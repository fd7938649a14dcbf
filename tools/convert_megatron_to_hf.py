"""Megatron checkpoint (any iteration, saved at any TP/PP) -> Hugging Face safetensors folder.

    python tools/convert_megatron_to_hf.py --load-dir ckpt/run1 [--iteration 200] --save-dir hf/run1-step200
Same as `dapo-megatron convert megatron-to-hf ...`; see dapo_megatron/models/convert.py.
"""
import sys

from dapo_megatron.cli import main

if __name__ == "__main__":
    main(["convert", "megatron-to-hf", *sys.argv[1:]])  # the CLI's one-line errors: dapo-megatron convert: ...
