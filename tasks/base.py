"""Helpers the built-in tasks share: tables of methods x columns, the truncate baseline, greedy decoding."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import torch


def ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def method_table(values: dict, rows: list[str], columns, index_name="method", oom: set | None = None) -> pd.DataFrame:
    """{(row, column): value} -> rows in the given order (methods, in run order); missing cells are NaN,
    or 'OOM' where the cell ran out of memory."""
    import pandas as pd

    df = pd.DataFrame(index=pd.Index(rows, name=index_name), columns=[str(c) for c in columns], dtype=object)
    for (label, col), value in values.items():
        if label in rows:
            df.loc[label, str(col)] = value
    for label, col in oom or ():
        if label in rows and str(col) in df.columns and pd.isna(df.loc[label, str(col)]):
            df.loc[label, str(col)] = "OOM"
    return df.where(df.notna(), float("nan"))


def truncated(method, ids, l_pre: int):
    """The paper's Table 2 baseline keeps only the last L_pre tokens, re-encoded (ids: a token list, or a
    tensor whose last dim is the sequence)."""
    if not method.truncate:
        return ids
    return ids[-l_pre:] if isinstance(ids, list) else ids[..., -l_pre:]


def greedy(
    model, ids: torch.Tensor, new_tokens: int, pad_token_id: int | None, compile: bool = False, mask=None
) -> torch.Tensor:
    """[b, new_tokens]: exactly `new_tokens` greedy tokens per row (EOS suppressed until then), through the
    method's own cache; `mask`: the rows' left padding (None: none); `compile`: a method whose cache is bounded
    decodes through the ring cache with a compiled step."""
    import torch

    mask = torch.ones_like(ids) if mask is None else mask
    if compile and can_compile(model):
        from lminf_eval.ring_cache import greedy_ring

        return greedy_ring(model, ids, new_tokens, attention_mask=mask, suppress=model.generation_config.eos_token_id)

    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
        )
    return out[:, ids.shape[1] :]


def length_dependent(settings) -> bool:
    """Whether a method's rotation depends on the length of the forward (transformers' dynamic NTK): its
    perplexity at L needs a forward of length L, and padding a row changes its rotation. PI and YaRN take a
    run-wide factor, the kernel's rules a distance per pair: one forward serves every length for them."""
    from lminf_eval.rope_scaling import LENGTH_DEPENDENT

    return settings is not None and settings.rope_type in LENGTH_DEPENDENT


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of (nearly) one length as a batch: ids and attention mask, padded on the left as generate()
    expects (distances count real tokens, so a padded row gets what it gets alone)."""
    import torch

    n = max(map(len, rows))
    ids = torch.tensor([[pad] * (n - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def can_compile(model) -> bool:
    """Whether `--compile` applies to the method `model` is patched with (a cache a ring can hold)."""
    from lminf_eval.ring_cache import supports

    return supports(getattr(getattr(model, "lm_infinite", None), "settings", None))


def check_compile(ctx) -> None:
    """`--compile` with no method it applies to is a mistake: one line naming the fix."""
    from lminf_eval.errors import UserError
    from lminf_eval.ring_cache import supports

    if not any(supports(s) for s in ctx.settings.values()):
        names = ", ".join(m.label for m in ctx.methods)
        raise UserError(
            f"--compile decodes through the ring cache, which serves methods with a bounded cache (lm-infinite, "
            f"streaming-llm, window, lambda-only; top_k 0); none of {names} has one: add one or drop --compile"
        )


def slug(label: str) -> str:
    """A method label (`lm-infinite:top_k=5`) as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
