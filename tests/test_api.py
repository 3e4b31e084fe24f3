"""The extension points: task and model-family registries refuse a taken name; a task's documents come through
one helper that passes every document flag (diagnose once dropped --split); `truncate` is its preset's own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import lminf_eval
from lminf_eval.errors import LMInfiniteError, UserError
from lminf_eval.families import FAMILIES, Family, family_of, register_family
from lminf_eval.harness.task import TASKS, Task, register_task
from lminf_eval.methods import PRESETS, parse_method


def test_register_task_refuses_a_taken_name():
    from lminf_eval.tasks.ppl import Perplexity as ppl

    assert TASKS["ppl"] is ppl

    class Other(Task):
        name = "ppl"

    with pytest.raises(UserError, match="'ppl'.*taken"):
        register_task(Other)
    assert TASKS["ppl"] is ppl
    assert register_task(ppl) is ppl  # (the same class again: a no-op, as when an entry point names it)


def test_register_family_refuses_a_taken_name():
    llama = FAMILIES["llama"]
    with pytest.raises(LMInfiniteError, match="'llama' is already registered"):
        register_family(Family("llama"))
    assert FAMILIES["llama"] is llama and lminf_eval.FAMILIES is FAMILIES


def test_every_family_says_how_position_and_attention_are_reached():
    expected = {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi", "gptj", "mpt", "bloom"}
    assert set(FAMILIES) == expected
    for name, family in FAMILIES.items():
        assert family.name == name and family.kind in ("rope", "alibi")
        assert family.registry_attention == (family.kind == "rope")
    with pytest.raises(LMInfiniteError, match="unsupported architecture 'gpt2'"):
        family_of(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))


def test_diagnose_reads_documents_with_the_runs_split(monkeypatch):
    from lminf_eval.tasks.diagnose import Diagnose

    from lminf_eval.harness import data

    asked = []
    monkeypatch.setattr(data, "load_documents", lambda *args: asked.append(args) or ["doc"])
    run_config = SimpleNamespace(dataset="org/corpus", text_field="body", split="validation", options=None)
    model = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    ctx = SimpleNamespace(run_config=run_config, methods=[parse_method("vanilla")], model=model, lengths=[256])
    ctx.tokenizer = "tokenizer"
    task = Diagnose(ctx)
    task.prepare()
    assert task.docs == ["doc"] and asked == [("org/corpus", "tokenizer", 1, 256, 256, "body", "validation")]


def test_truncate_is_a_property_of_its_preset():
    assert [name for name in PRESETS if parse_method(name).truncate] == ["truncate"]
