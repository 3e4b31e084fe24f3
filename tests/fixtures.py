"""Tiny on-disk checkpoints and corpora for CLI tests: a byte-level BPE tokenizer trained on a few
sentences, random weights, L_pre = 32, and text files long enough for 8x that."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from models import tiny_model

WORDS = "the of and model attention window token length paper result table figure proof lemma we show".split()


def sentences(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return " ".join(out)


def tokenizer(vocab: int = 96) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([sentences(200)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def checkpoint(path: Path, family: str = "llama", l_pre: int = 32) -> Path:
    tok = tokenizer()
    model = tiny_model(family)
    cfg = model.config
    for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
        if hasattr(cfg, key):
            setattr(cfg, key, l_pre)
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    model.resize_token_embeddings(len(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def corpus(path: Path, docs: int = 3, sentences_per_doc: int = 120) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (path / f"doc{i}.txt").write_text(sentences(sentences_per_doc, seed=i + 1))
    return path


def tiny_files(root: Path) -> SimpleNamespace:
    """A Llama checkpoint (L_pre 32) and a corpus of 3 documents of ~5k tokens under `root`."""
    return SimpleNamespace(model=checkpoint(root / "model"), data=corpus(root / "corpus"))


def takes(command: str, flag: str) -> bool:
    """Whether `lminf-eval COMMAND` has `--flag` (a task's command lists only the flags it reads)."""
    from lminf_eval.harness.task import TASKS

    task_type = TASKS.get(command)
    return task_type is None or flag.lstrip("-").replace("-", "_") not in task_type.ignores


def run(tiny: SimpleNamespace, *args, out=None):
    """`lminf-eval ARGS` in this process on the tiny files: model, corpus and --n-global 4 added where the
    command reads them and `args` do not give them."""
    from typer.testing import CliRunner

    from lminf_eval.harness.cli import app

    base = ["--model", tiny.model, "--dataset", tiny.data, "--n-global", "4"]
    pairs = zip(base[::2], base[1::2], strict=True)
    base = [x for flag, value in pairs if takes(args[0], flag) and flag not in args for x in (flag, value)]
    if out is not None:
        base += ["--output-dir", out]
    return CliRunner().invoke(app, [str(a) for a in (*args, *base)])
