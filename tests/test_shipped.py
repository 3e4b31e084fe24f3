"""What the repo ships: registry entries, the offline corpora, the tiny models, and the effect itself."""

from __future__ import annotations

import importlib.util
import json
import re

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from lminf_eval.harness.cli import app
from lminf_eval.harness.data import DATASETS, load_documents
from lminf_eval.harness.models import REGISTRY, REPO_ROOT, gguf_in_package, load_model

spec = importlib.util.spec_from_file_location("train_tiny", REPO_ROOT / "scripts" / "train_tiny.py")
train_tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_tiny)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_model_registry_resolves(name):
    entry = REGISTRY[name]
    if entry.kind == "local":
        assert (REPO_ROOT / entry.target / "config.json").exists()
        assert sum(f.stat().st_size for f in (REPO_ROOT / entry.target).iterdir()) <= 10 * 2**20
    elif entry.kind == "gguf-package":
        assert gguf_in_package(entry.target).suffix == ".gguf"
    else:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.target)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_model("smollm2-135m")[1]


@pytest.mark.parametrize("name", ["arxiv-sample", "web-sample"])
def test_shipped_corpus_requirements(name, smollm2_tokenizer):
    root = REPO_ROOT / DATASETS[name].target
    docs = load_documents(name, smollm2_tokenizer, num_docs=None, min_tokens=1, max_tokens=10**9)
    assert len(docs) >= 8 and sum(len(d.ids) >= 32_768 for d in docs) >= 8
    sources = (root.parent / "SOURCES.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in sources.splitlines() if line.startswith("| ")}
    files = [p for split in ("eval", "train") for p in sorted((root.parent / split).glob("*.txt"))]
    for file in files:  # every file has its package, path and licence recorded
        row = rows[f"{file.parent.name}/{file.name}"]
        assert len([c for c in row.split(" | ") if c.strip()]) == 5
    packages = {rows[f"eval/{p.name}"].split(" | ")[1].split()[0] for p in root.glob("*.txt")}
    assert len(packages) >= 4
    train = {p.read_text() for p in (root.parent / "train").glob("*.txt")}
    assert train and not train & {p.read_text() for p in root.glob("*.txt")}


def test_shipped_data_size():
    assert sum(p.stat().st_size for p in (REPO_ROOT / "data").rglob("*") if p.is_file()) <= 10 * 2**20


@pytest.mark.parametrize("name", ["tiny-rope", "tiny-alibi"])
def test_tiny_model_reproduces_recorded_validation_loss(name):
    model, tok = load_model(name)
    recorded = json.loads((REPO_ROOT / "models" / name / "training.json").read_text())["meta"]
    assert model.config.model_type == ("llama" if name == "tiny-rope" else "mpt")
    loss = train_tiny.validation_loss(model, train_tiny.validation_windows(tok))
    assert loss == pytest.approx(recorded["validation_loss"], abs=1e-4)


def test_lm_infinite_effect_on_tiny_rope(tmp_path):
    """The effect the project exists to show: past the training length vanilla degrades, LM-Infinite not."""
    args = [
        "ppl",
        "--model",
        "tiny-rope",
        "--lengths",
        "1x,8x",
        "--num-docs",
        "4",
        "--bucket-size",
        "128",
        "--output-dir",
        str(tmp_path),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ppl = pd.read_csv(tmp_path / "ppl.csv", index_col=0)
    assert ppl.loc["vanilla", "2048"] >= 2 * ppl.loc["lm-infinite", "2048"]
    assert ppl.loc["lm-infinite", "2048"] <= 1.3 * ppl.loc["lm-infinite", "256"]
    assert ppl.loc["vanilla", "256"] == pytest.approx(ppl.loc["lm-infinite", "256"], rel=1e-4)


def test_smollm2_loads_with_its_pretraining_length():
    model, tok = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 8192
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("profile", ["quick", "default", "paper"])
def test_reproduction_profiles_parse(profile, monkeypatch):
    """Every step of a shipped profile is a valid command: known flags, config-file keys, methods, settings."""
    import shlex

    import typer
    import yaml

    from lminf_eval.harness.cli import collect
    from lminf_eval.harness.config import parse_lengths
    from lminf_eval.harness.task import TASKS
    from lminf_eval.methods import parse_methods

    monkeypatch.chdir(REPO_ROOT)  # (steps name configs/*.yaml relative to the repository)
    steps = yaml.safe_load((REPO_ROOT / "configs" / f"{profile}.yaml").read_text())["steps"]
    group = typer.main.get_command(app)
    for step, command in steps.items():
        name, *args = shlex.split(command)
        ctx = group.commands[name].make_context(name, args)  # unknown flags raise here
        run_config = collect(TASKS[name], ctx, dict(ctx.params))
        target = max(parse_lengths(run_config.lengths or TASKS[name].default_lengths, 4096))
        for method in parse_methods(run_config.method):
            method.settings(4096, target, TASKS[name].settings_defaults, run_config.settings)
        assert run_config.command == name, step


def test_reproduce_reruns_a_step_whose_command_changed(tmp_path, monkeypatch):
    """A step is skipped only while its folder holds what the profile asks for; flag order does not matter."""
    spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    monkeypatch.chdir(REPO_ROOT)
    step = ["ppl", "--model", "tiny-rope", "--lengths", "1x,2x", "--num-docs", "2"]
    argv = ["lminf-eval", "ppl", "--num-docs", "2", "--lengths", "1x,2x", "--model", "tiny-rope"]
    (tmp_path / "results.json").write_text(json.dumps({"argv": [*argv, "--output-dir", "x", "--resume"]}))
    assert not reproduce.changed(tmp_path, step)
    assert reproduce.changed(tmp_path, [*step, "--n-global", "5"])
    assert reproduce.changed(tmp_path, ["ppl", "--model", "tiny-rope", "--lengths", "1x,4x", "--num-docs", "2"])
    (tmp_path / "results.json").write_text(json.dumps({"command": "ppl"}))  # older folders: no argv kept
    assert not reproduce.changed(tmp_path, [*step, "--n-global", "5"])
