import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

try:  # lm-eval binds its log handlers to the stderr of the moment it is first imported: make that the real one,
    import lm_eval  # noqa: F401  (not a CliRunner's, which is closed once its invocation ends)
    import lm_eval.evaluator  # noqa: F401
except ImportError:
    pass
