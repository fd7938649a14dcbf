"""Verifiers (DAPO `Answer:` rule, `\\boxed{}` + math-verify, GSM8K, remote RM) run in a process pool."""
from dapo_megatron.reward.config import RewardConfig
from dapo_megatron.reward.pool import VerifierPool, VerifyResult
from dapo_megatron.reward.registry import get_verifier
from dapo_megatron.reward.scorer import RewardScorer

__all__ = ["RewardConfig", "RewardScorer", "VerifierPool", "VerifyResult", "get_verifier"]
