"""The paper's evaluations, one module each; importing this package registers them (`lminf_eval.harness.task.TASKS`)."""

from . import diagnose, generate, lmeval, passkey, ppl, stream, timing

__all__ = ["diagnose", "generate", "lmeval", "passkey", "ppl", "stream", "timing"]
