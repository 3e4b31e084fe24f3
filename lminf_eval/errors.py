"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""


class UserError(ValueError):
    """Bad input that the user can fix; the message names the fix."""


INSTALL_LM_EVAL = "lm-eval is not installed: pip install 'lminf-eval[lm-eval]'"
