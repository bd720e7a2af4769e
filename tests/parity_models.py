"""Tiny Llama checkpoints drawn from a seeded torch.Generator (not transformers' initialisers, which change
between versions), so the mergekit parity references (`tests/data/mergekit_parity_refs.safetensors`,
written once by `scripts/make_parity_references.py` with real mergekit) stay valid wherever the tests run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIGS = Path(__file__).parent / "data" / "mergekit_configs"
REFERENCES = Path(__file__).parent / "data" / "mergekit_parity_refs.safetensors"
HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 16, 32, 4, 32, 2, 1
HEAD_DIM = HIDDEN // HEADS
# The tensors a reference keeps (the rest would make the file large): the ends, a middle attention and a
# last-layer MLP weight (gradients reach t = 1/3 and 1 there; the configs slice 4 layers).
KEPT = ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
        "model.norm.weight", "lm_head.weight")
# (config, variant, arithmetic) with a reference; variant as in scripts/mergekit_parity.py
CASES = (
    ("examples_ties", "bf16"), ("examples_ties", "fp32"), ("examples_gradient_slerp", "fp16"), ("examples_linear", "bf16"),
    ("examples_bio_merge", "fp16"), ("examples_orcamini_platy", "fp32"), ("ties_filters", "fp32"),
    ("model_stock_filter_wise", "bf16"), ("breadcrumbs_slices", "bf16"), ("linear_base_weight", "fp32"),
    ("nuslerp", "bf16"), ("karcher", "fp32"), ("sce", "bf16"), ("ram", "fp16"), ("examples_arcee_fusion", "bf16"),
    ("dare_ties", "fp32"),
)
VARIANTS = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"), "fp16": ("float32", "float16")}  # models, dtype


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN), p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
    return out | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def tensors(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A base (norms near 1, weights ~ 0.1 N(0, 1)), or a fine-tune of `base` (+ 0.02 N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes().items():
        noise = torch.randn(shape, generator=g)
        if base is not None:
            out[name] = base[name] + 0.02 * noise
        else:
            out[name] = 1 + 0.05 * noise if name.endswith("norm.weight") else 0.1 * noise
    return out


def config(dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
    }


def write_models(root: Path) -> Path:
    """base, a, b, c under root/float32 and root/bfloat16; returns root."""
    base = tensors(0)
    models = {"base": base, **{name: tensors(10 + i, base) for i, name in enumerate("abc")}}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for name, weights in models.items():
            folder = root / dtype / name
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(torch_dtype).contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(config(dtype)))
    return root


def render(config_name: str, variant: str, models: Path) -> str:
    """The config's text with {base}, {a}, {b}, {c} filled in and its dtype set by the variant."""
    text = (CONFIGS / f"{config_name}.yaml").read_text()
    folder = models / VARIANTS[variant][0]
    for name in ("base", "a", "b", "c"):
        text = text.replace("{" + name + "}", str(folder / name))
    return re.sub(r"^dtype: \w+$", f"dtype: {VARIANTS[variant][1]}", text, flags=re.M)
