import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

try:  # nltk (RULER's data prep) binds `print_error_to=sys.stderr` when first imported: make that the real
    import lm_eval  # noqa: F401  stderr, not a CliRunner's, which is closed once its invocation ends
    import lm_eval.evaluator  # noqa: F401
    import nltk.downloader  # noqa: F401
except ImportError:
    pass


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny checkpoint and corpus every CLI test runs on (`fixtures.tiny_files`)."""
    import fixtures

    return fixtures.tiny_files(tmp_path_factory.mktemp("tiny"))
