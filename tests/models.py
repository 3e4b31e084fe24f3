"""Random tiny models of every supported family, with weights large enough that attention is sharp and
position-sensitive (default 0.02 init gives near-uniform attention, which would hide masking bugs)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

L_PRE = 16
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, tie_word_embeddings=False)


def _rope(theta=10000.0, **extra):
    return {"rope_type": "default", "rope_theta": theta, **extra}


CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=L_PRE,
        rope_parameters=_rope(100.0),
        **COMMON,
    ),
    "llama3": lambda: LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=L_PRE,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        **COMMON,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=L_PRE,
        sliding_window=None,
        rope_parameters=_rope(100.0),
        **COMMON,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=L_PRE,
        rope_parameters=_rope(100.0),
        **COMMON,
    ),
    "qwen3": lambda: Qwen3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=L_PRE,
        rope_parameters=_rope(100.0),
        **COMMON,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=L_PRE,
        rope_parameters=_rope(100.0, partial_rotary_factor=0.5),
        **COMMON,
    ),
    "phi": lambda: PhiConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=L_PRE,
        rope_parameters=_rope(100.0, partial_rotary_factor=0.5),
        **COMMON,
    ),
    "gptj": lambda: GPTJConfig(
        n_embd=64,
        n_inner=96,
        n_layer=3,
        n_head=4,
        rotary_dim=8,
        n_positions=L_PRE,
        **COMMON,
    ),
    "mpt": lambda: MptConfig(d_model=64, n_heads=4, n_layers=3, expansion_ratio=2, max_seq_len=L_PRE, **COMMON),
    "bloom": lambda: BloomConfig(hidden_size=64, n_head=4, n_layer=3, **COMMON),
}
FAMILY_NAMES = list(CONFIGS)


def tiny_model(name: str, seed: int = 0, scale: float = 0.35) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, scale / p.shape[-1] ** 0.25)
    return model.eval()


def lm_kwargs(name: str) -> dict:
    """Bloom's config carries no pretraining length: tests give it one."""
    return {"pretraining_length_override": L_PRE} if name == "bloom" else {}
