"""Attention math: the Λ-shaped kernel and how each family encodes relative position."""
