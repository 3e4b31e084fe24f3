"""Train the shipped tiny models (`tiny-rope`: Llama, `tiny-alibi`: MPT) at L_pre = 256 on the train splits
of the shipped corpora. Seeded; ~25 minutes each on a 2-core CPU.

    python scripts/train_tiny.py --arch llama --out models/tiny-rope [--steps 1500]

Every training sample starts with BOS, as real LLM pretraining samples do; that is what teaches a model to
park attention on its first token, the behaviour LM-Infinite's global tokens rely on.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

L_PRE = 256
VOCAB = 4096
CORPORA = ["data/arxiv-sample", "data/web-sample"]


def texts(split: str) -> list[str]:
    return [p.read_text() for c in CORPORA for p in sorted((ROOT / c / split).glob("*.txt"))]


def build_tokenizer(out: Path):
    """Byte-level BPE on the train splits only; shared by both tiny models (trained once, then reused)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    shared = ROOT / "models" / "tokenizer"
    if (shared / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(shared)
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        core.train_from_iterator(texts("train"), trainer)
        core.post_processor = __import__("tokenizers").processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>")
        tok.save_pretrained(shared)
    tok.save_pretrained(out)
    return tok


def make_model(arch: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, MptConfig

    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=L_PRE,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    else:
        config = MptConfig(
            vocab_size=VOCAB,
            d_model=256,
            n_heads=4,
            n_layers=4,
            expansion_ratio=3,
            max_seq_len=L_PRE,
            no_bias=True,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            use_cache=True,
        )
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def samples(stream: list[list[int]], rng: random.Random, batch: int) -> torch.Tensor:
    """[BOS] + 255 consecutive tokens from a random place in a random document."""
    rows = []
    for _ in range(batch):
        doc = rng.choice(stream)
        start = rng.randrange(1, len(doc) - L_PRE + 1)
        rows.append([doc[0]] + doc[start : start + L_PRE - 1])
    return torch.tensor(rows)


def validation_windows(tok) -> torch.Tensor:
    """First L_PRE tokens (BOS included) of every eval document: held out, fixed."""
    return torch.tensor([tok(t).input_ids[:L_PRE] for t in texts("eval")])


@torch.no_grad()
def validation_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [model(w[None], labels=w[None], use_cache=False).loss.item() for w in windows]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["llama", "mpt"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.out)
    stream = [ids for ids in (tok(t).input_ids for t in texts("train")) if len(ids) > L_PRE + 1]
    model = make_model(args.arch)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    windows = validation_windows(tok)
    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        model.train()
        batch = samples(stream, rng, args.batch)
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            entry = {"step": step, "train_loss": round(loss.item(), 4), "minutes": round((time.time() - start) / 60, 2)}
            if step % 250 == 0 or step == args.steps:
                entry["val_loss"] = round(validation_loss(model, windows), 4)
            curve.append(entry)
            print(json.dumps(entry), flush=True)
    model = model.to(torch.bfloat16)  # the shipped weights; everything below is measured on them
    model.save_pretrained(args.out)
    model = type(model).from_pretrained(args.out, dtype=torch.float32)
    val = validation_loss(model, windows)
    meta = {
        "arch": args.arch,
        "parameters": n_params,
        "L_pre": L_PRE,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "train_tokens": args.steps * args.batch * L_PRE,
        "minutes": round((time.time() - start) / 60, 1),
        "validation_loss": val,
        "validation_windows": int(windows.shape[0]),
        "command": " ".join(["python"] + sys.argv),
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps({"meta": meta, "curve": curve}, indent=1))
    plot(curve, args.out / "loss_curve.png", args.arch)
    card(args.out, meta)
    print(json.dumps(meta))


def plot(curve, path: Path, arch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["train_loss"] for c in curve], label="train")
    val = [c for c in curve if "val_loss" in c]
    ax.plot([c["step"] for c in val], [c["val_loss"] for c in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"tiny {arch}, L_pre = {L_PRE}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def card(out: Path, meta: dict) -> None:
    family = "Llama (RoPE, GQA 4:2)" if meta["arch"] == "llama" else "MPT (ALiBi)"
    (out / "README.md").write_text(
        f"# {out.name}\n\nA {meta['parameters'] / 1e6:.1f}M-parameter {family} trained from scratch at "
        f"L_pre = {meta['L_pre']} tokens, so that 32x its training length fits in seconds on a CPU.\n\n"
        f"- data: train splits of data/arxiv-sample and data/web-sample (Debian package docs, see their "
        f"SOURCES.md); every sample starts with BOS\n- {meta['steps']} steps x {meta['batch']} x {meta['L_pre']} "
        f"tokens = {meta['train_tokens']:,} tokens, AdamW lr {meta['lr']}, cosine, seed {meta['seed']}, "
        f"{meta['minutes']} minutes on this CPU\n- validation loss {meta['validation_loss']:.4f} "
        f"(first {meta['L_pre']} tokens of the {meta['validation_windows']} eval documents, bf16 weights)\n"
        f"- rebuild: `{meta['command']}`\n\n![loss curve](loss_curve.png)\n\nNot a useful language model: a "
        "test subject for length generalisation.\n"
    )


if __name__ == "__main__":
    main()
