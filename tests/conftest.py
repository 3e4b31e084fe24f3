import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

try:  # nltk (RULER's data prep) binds `print_error_to=sys.stderr` when first imported: make that the real
    import lm_eval  # noqa: F401  stderr, not a CliRunner's, which is closed once its invocation ends
    import lm_eval.evaluator  # noqa: F401
    import nltk.downloader  # noqa: F401
except ImportError:
    pass
