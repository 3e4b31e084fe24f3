"""`python -m lminf_eval ...` (and `accelerate launch -m lminf_eval ...`)."""

from .cli import main

main()
