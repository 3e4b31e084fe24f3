"""`python -m lminf_eval ...` (and `accelerate launch -m lminf_eval ...`)."""

from .harness.cli import main

main()
