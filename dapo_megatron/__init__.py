"""dapo_megatron: DAPO RL post-training on megatron-core with an SGLang-API rollout."""
from . import quiet

quiet.install()  # before any megatron-core import: its import-time notices (quiet.py says which and why)

__version__ = "0.1.0"
