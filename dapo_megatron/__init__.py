"""dapo_megatron: DAPO RL post-training on megatron-core with an SGLang-API rollout."""

__version__ = "0.1.0"
