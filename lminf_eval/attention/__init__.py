"""LM-Infinite's attention: the rules and the plan (`plan`), the backends (`blocks`, `flex`), the dispatch
(`kernel`), the log-sum-exp merge (`merge`) and relative positions (`positions`)."""

from .dispatch import backend_for, lambda_attention
from .plan import Plan
from .positions import Alibi, Rope

__all__ = ["Alibi", "Plan", "Rope", "backend_for", "lambda_attention"]
