"""Re-export of `dapo_megatron.types.Sample` (kept so `from dapo_megatron.rollout.sample import Sample` works)."""
from ..types import Sample  # noqa: F401
