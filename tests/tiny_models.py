"""Tiny randomly initialised HF checkpoints for tests that need real files but no trained skills."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(family: str, **overrides):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
        cfg = cls(**common)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def save_tiny(path: Path, family: str = "llama", seed: int = 0, *, perturb_from: Path | None = None, **overrides) -> Path:
    """Save a tiny model; with perturb_from, a 'fine-tune' of that checkpoint (small random deltas)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if perturb_from is not None:
        model = AutoModelForCausalLM.from_pretrained(perturb_from)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    model.save_pretrained(path)
    return path
