"""What the library needs to know of one model family, and the one registry that finds it.

A `Family` answers, for one transformers `model_type`: how attention is reached (transformers' attention
registry, or a replacement forward where the model computes attention inline), how relative position is
encoded (rotary `inv_freq` or ALiBi slopes, read from the model's own parameters), what else a patched model
needs (GPT-J's sin/cos table), and how vanilla runs past the model's own tables. `patch.py`, `methods.py` and
the `diagnose` task read a family through this interface only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from torch import nn

from ..attention.positions import Alibi, Rope
from ..errors import LMInfiniteError


def unchanged(model: nn.Module) -> None:
    """The undo of a change that changed nothing."""


class Family:
    """One model family (one `model_type`). Subclass it, then `register_family(YourFamily("model_type"))`."""

    kind: ClassVar[str] = ""  # how relative position enters attention: "rope" or "alibi"
    # attention reached through transformers' attention registry (else the family installs replacement forwards)
    registry_attention: ClassVar[bool] = True

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def position(self, model: nn.Module) -> Rope | Alibi:
        """How `model` encodes relative position, read from its own parameters."""
        raise NotImplementedError

    def install(self, model: nn.Module, patch, config) -> None:
        """What a patched model needs beyond the registered attention function. Every change goes through
        `patch.set(obj, name, value)` (deleted on remove) or `patch.restore_later(obj, name)` (put back on
        remove), so that `remove_lm_infinite` undoes it; objects held must be the model's own (`copy.deepcopy`
        of a patched model copies them), not closures. `config` is the patched model's own config copy."""

    def allow_long_vanilla(self, model: nn.Module) -> Callable[[nn.Module], None]:
        """Let the unmodified model run past its tables (extended with the same formula); returns the undo."""
        return unchanged


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` the adapter for models whose config says `model_type == family.name`; a name is taken
    once (a second registration is refused, so two adapters never silently replace each other)."""
    if not family.name:
        raise LMInfiniteError(f"{family!r} has no model_type name")
    if family.name in FAMILIES:
        raise LMInfiniteError(f"model family {family.name!r} is already registered ({FAMILIES[family.name]!r})")
    FAMILIES[family.name] = family
    return family


def family_of(model: nn.Module) -> Family:
    """The adapter for `model` (by its config's `model_type`); an unsupported architecture, or a model without
    a config, is a one-line error naming the supported families."""
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise LMInfiniteError(
            f"unsupported architecture {getattr(config, 'model_type', type(model).__name__)!r}: "
            f"LM-Infinite supports {', '.join(sorted(FAMILIES))}"
        )
    return family
