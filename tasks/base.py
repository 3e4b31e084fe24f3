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


def truncated(method, ids: torch.Tensor, l_pre: int) -> torch.Tensor:
    """The paper's Table 2 baseline keeps only the last L_pre tokens, re-encoded."""
    return ids[..., -l_pre:] if method.truncate else ids


def greedy(model, ids: torch.Tensor, new_tokens: int, pad_token_id: int | None, compile: bool = False) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens (EOS suppressed until then), through the method's own cache;
    `compile`: a method whose cache is bounded decodes through the ring cache with a compiled step."""
    import torch

    if compile and can_compile(model):
        from lminf_eval.ring_cache import greedy_ring

        return greedy_ring(model, ids, new_tokens, suppress=model.generation_config.eos_token_id)[0]

    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
        )
    return out[0, ids.shape[1] :]


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
