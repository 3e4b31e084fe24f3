"""The real pretrained model: SmolLM2-135M (Llama, GQA 9:3, RoPE base 1e5, L_pre 8192) from its GGUF wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import reference

from lminf_eval import apply_lm_infinite, remove_lm_infinite
from lminf_eval.harness.models import load_model

N, WINDOW = 2048, 1024


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tok = load_model("smollm2-135m")
    except Exception as err:  # the wheel is installed by `make setup`; without it this test cannot run
        pytest.skip(f"SmolLM2 unavailable: {err}")
    text = _long_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :N]
    assert ids.shape[1] == N
    return model, ids


def _long_text() -> str:
    root = Path(__file__).resolve().parent.parent / "data" / "web-sample" / "eval"
    return next(iter(sorted(root.glob("*.txt")))).read_text()


def test_smollm2_patched_equals_reference_and_vanilla_is_restored(smollm2):
    model, ids = smollm2
    with torch.no_grad():
        vanilla = model(ids, use_cache=False).logits
        apply_lm_infinite(model, n_global=10, n_local=WINDOW, limit_distance=WINDOW)
        ours = model(ids, use_cache=False).logits
        with reference(model):
            ref = model(ids, use_cache=False).logits
        remove_lm_infinite(model)
        restored = model(ids, use_cache=False).logits
    assert torch.equal(restored, vanilla)
    torch.testing.assert_close(ours[:, :WINDOW], vanilla[:, :WINDOW], atol=1e-3, rtol=0)  # inside the window
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)
    assert (ours[:, WINDOW:] - vanilla[:, WINDOW:]).abs().max() > 0.1  # the method did change something
