"""Prompt datasets (JSONL / Parquet, DAPO-Math-17k or plain layout), templates, resumable sampling."""
from dapo_megatron.data.dataset import DataError, PromptDataset, PromptItem
from dapo_megatron.data.sampler import EpochSampler
from dapo_megatron.data.templates import DAPO_TEMPLATE, format_question, render_messages

__all__ = ["DAPO_TEMPLATE", "DataError", "EpochSampler", "PromptDataset", "PromptItem", "format_question",
           "render_messages"]
