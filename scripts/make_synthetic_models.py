"""Write a synthetic Llama-shaped base and perturbed "fine-tunes" as HF checkpoint folders (no tokenizer).

    python scripts/make_synthetic_models.py DIR --params 0.5e9 --dtype bfloat16 --sources 3

writes DIR/base and DIR/source1..N, each with config.json and model.safetensors (sharded above 2 GiB).
Weights are random (std 0.02; norms 1), sources are base + 0.002 * noise: the sizes and shapes of a
real model, for measuring merge memory and speed, with nothing to score. Tensors are generated and
written one at a time, so making them needs about one tensor of memory. `llama_shapes` is shared with
scripts/bench_merge.py.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 1024, 2816, 32000, 16, 8
SOURCE_NOISE = 0.002


def llama_config(params: float, *, hidden: int = HIDDEN, vocab: int = VOCAB) -> dict:
    """A Llama config whose layer count brings the model near `params` parameters (at least 2 layers)."""
    intermediate = int(hidden * INTERMEDIATE / HIDDEN) // 64 * 64
    head_dim = hidden // HEADS
    per_layer = 2 * hidden * hidden + 2 * hidden * KV_HEADS * head_dim + 3 * hidden * intermediate + 2 * hidden
    layers = max(2, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim,
        vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def llama_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LlamaForCausalLM checkpoint, in HF's order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def synthetic_tensor(
    name: str, shape: tuple[int, ...], source: int, dtype: torch.dtype, base: torch.Tensor | None = None
) -> torch.Tensor:
    """Base weights (source 0) or base + small noise (source k), reproducible from the name alone.
    base: the fp32 base tensor when the caller has it already (saves drawing it again)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if base is None:
        base = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
    if not source:
        return base.to(dtype)
    gen.manual_seed(zlib.crc32(name.encode()) + 7919 * source)
    return (base + SOURCE_NOISE * torch.randn(shape, generator=gen)).to(dtype)


def write_model(folder: Path, config: dict, source: int, dtype: torch.dtype) -> None:
    from evomerge.models.checkpoints import TensorInfo, write_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(config)
    tensors: Iterator = ((n, synthetic_tensor(n, s, source, dtype)) for n, s in shapes)
    plan = [TensorInfo(n, s, dtype) for n, s in shapes]
    write_checkpoint(tensors, folder, config=config | {"torch_dtype": str(dtype).removeprefix("torch.")},
                     side_files_from=folder, plan=plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--params", type=float, default=0.5e9, help="approximate parameter count (default 0.5e9)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    args = parser.parse_args(argv)
    config = llama_config(args.params, hidden=args.hidden)
    dtype = getattr(torch, args.dtype)
    n_params = sum(torch.Size(s).numel() for _, s in llama_shapes(config))
    for source in range(args.sources + 1):
        folder = args.dir / ("base" if source == 0 else f"source{source}")
        write_model(folder, config, source, dtype)
        print(f"{folder}: {n_params / 1e6:.0f}M parameters, {config['num_hidden_layers']} layers, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
