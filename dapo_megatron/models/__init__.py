"""HF config -> megatron-core GPTModel (TE + FP8 layer spec on GPU, local spec on CPU)."""
from .builder import ModelConfig, build_model, build_gpt_model
from .hf_config import ModelArch, UnsupportedModelError, arch_from_hf, load_hf_config

__all__ = ["ModelConfig", "build_model", "build_gpt_model", "ModelArch", "UnsupportedModelError", "arch_from_hf",
           "load_hf_config"]
