"""The paper's evaluations, one module each; importing this package registers them (`lminf_eval.harness.task.TASKS`)."""

from . import diagnose, generate, harness, passkey, ppl, stream, timing

__all__ = ["diagnose", "generate", "harness", "passkey", "ppl", "stream", "timing"]
