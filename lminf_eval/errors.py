"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""


class UserError(ValueError):
    """Bad input that the user can fix; the message names the fix."""


class LMInfiniteError(UserError):
    """The library's error: a bad argument or an unsupported model; one line that names the fix."""


class ModelError(UserError):
    """A model that cannot be found or loaded; the message is one line and names the fix."""


INSTALL_LM_EVAL = "lm-eval is not installed: pip install 'lminf-eval[lm-eval]'"


def shown(value, limit: int = 60) -> str:
    """A value echoed in an error message, cut short: a message is one line, whatever the input held."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...)" if text[0] in "[({" else text[:limit] + "..."
