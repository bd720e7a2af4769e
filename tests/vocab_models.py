"""Tiny seeded Llama checkpoints whose vocabularies differ, with tokenizers: a base and a fine-tune of 32
tokens, an instruct fine-tune `ia` that added 2 special tokens (34 rows) and `ib` that added 3 (35 rows);
and a LoRA adapter on the base (`lora`, written in peft's format from seeded tensors).

`scripts/make_parity_references.py` runs the `vocab_*` and `lora_*` configs over them through real mergekit
once and keeps `KEPT` of each result in `tests/data/mergekit_vocab_refs.safetensors`;
`tests/test_mergekit_vocab.py` and `tests/test_mergekit_lora.py` run the same configs through `evomerge merge`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from parity_models import CONFIGS, HIDDEN, VOCAB, config, tensors

REFERENCES = Path(__file__).parent / "data" / "mergekit_vocab_refs.safetensors"
ADDED = {"ia": ("<|im_start|>", "<|im_end|>"), "ib": ("<|im_start|>", "<|im_end|>", "<|tool|>")}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}")
KEPT = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight")
CONFIG_NAMES = ("vocab_union_ties", "vocab_base_task_arithmetic", "vocab_model_slerp", "vocab_tokens_block")
CASES = tuple((c, v) for c in CONFIG_NAMES for v in ("fp32", "bf16"))
VARIANTS = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16")}  # models, dtype


def tokenizer(added: tuple[str, ...] = (), chat_template: str | None = None):  # noqa: ANN201 -- a transformers tokenizer
    """The parity models' word-level tokenizer (32 tokens), plus `added` special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(VOCAB - 4)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if added:
        tok.add_special_tokens({"additional_special_tokens": list(added)})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def with_rows(weights: dict[str, torch.Tensor], count: int, seed: int) -> dict[str, torch.Tensor]:
    """`weights` with `count` more embedding and head rows (~ 0.1 N(0, 1)), as a fine-tune that added tokens has."""
    g = torch.Generator().manual_seed(seed)
    out = dict(weights)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        out[name] = torch.cat([weights[name], 0.1 * torch.randn(count, HIDDEN, generator=g)])
    return out


def write_models(root: Path) -> Path:
    """base, a, ia, ib under root/float32 and root/bfloat16, each with its tokenizer, and `lora` (an adapter
    on the base, fp32) beside them; returns root."""
    base = tensors(0)
    models = {"base": base, "a": tensors(10, base), "ia": with_rows(tensors(11, base), 2, 21), "ib": with_rows(tensors(12, base), 3, 22)}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for name, weights in models.items():
            folder = root / dtype / name
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(torch_dtype).contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(config(dtype) | {"vocab_size": VOCAB + len(ADDED.get(name, ()))}))
            tokenizer(ADDED.get(name, ()), CHATML if name == "ia" else None).save_pretrained(folder)
        write_adapter(root / dtype / "lora", 30, base)
    return root


def render(config_name: str, variant: str, models: Path) -> str:
    """The config with {base}, {a}, {ia}, {ib} filled in and its dtype set by the variant."""
    text = (CONFIGS / f"{config_name}.yaml").read_text()
    folder = models / VARIANTS[variant][0]
    for name in ("base", "a", "ia", "ib", "lora"):
        text = text.replace("{" + name + "}", str(folder / name))
    return re.sub(r"^dtype: \w+$", f"dtype: {VARIANTS[variant][1]}", text, flags=re.M)


def instruct_copy(src: Path, dst: Path, added: tuple[str, ...] = ADDED["ia"], seed: int = 0) -> Path:
    """A copy of checkpoint `src` as an instruct fine-tune that added `added` special tokens: its tokenizer
    has them and its embeddings and head one more row each (~ 0.02 N(0, 1)); config.vocab_size follows."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from evomerge.models.headers import CheckpointHeader, vocab_names

    names = vocab_names(CheckpointHeader.open(str(src)))
    weights = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name in names:
        extra = 0.02 * torch.randn(len(added), *weights[name].shape[1:], generator=g)
        weights[name] = torch.cat([weights[name], extra.to(weights[name].dtype)])
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + len(added)}))
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": list(added)})
    tok.save_pretrained(dst)
    return dst


# --- a LoRA adapter on the base (`{lora}`; `MODEL+ADAPTER` references) -------------------------------

LORA_CONFIG_NAMES = ("lora_ties", "lora_instruct_union")
LORA_CASES = tuple((c, v) for c in LORA_CONFIG_NAMES for v in ("fp32", "bf16"))
LORA_SHAPES = {"self_attn.q_proj": (16, 16), "self_attn.v_proj": (8, 16), "mlp.down_proj": (16, 32)}  # (out, in)


def adapter_tensors(seed: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-format LoRA (as `save_pretrained` writes it) on q_proj (r 4), v_proj (rank_pattern: r 2),
    down_proj (alpha_pattern) of every layer, on the embeddings (lora_embedding_A/B), and lm_head saved
    whole (modules_to_save); ~ 0.1 N(0, 1) entries, fp32."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(4):
        for module, (rows, cols) in LORA_SHAPES.items():
            r = 2 if module.endswith("v_proj") else 4
            key = f"base_model.model.model.layers.{layer}.{module}"
            out[f"{key}.lora_A.weight"] = 0.1 * torch.randn(r, cols, generator=g)
            out[f"{key}.lora_B.weight"] = 0.1 * torch.randn(rows, r, generator=g)
    out["base_model.model.model.embed_tokens.lora_embedding_A"] = 0.1 * torch.randn(4, VOCAB, generator=g)
    out["base_model.model.model.embed_tokens.lora_embedding_B"] = 0.1 * torch.randn(HIDDEN, 4, generator=g)
    out["base_model.model.lm_head.weight"] = base["lm_head.weight"] + 0.02 * torch.randn(VOCAB, HIDDEN, generator=g)
    return out


def write_adapter(folder: Path, seed: int, base: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_tensors(seed, base).items()}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
              "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 4}, "modules_to_save": ["lm_head"], "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
              "inference_mode": True, "init_lora_weights": True, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def extracted_adapter(base: Path, tuned: Path, out: Path, rank: int = 16) -> Path:
    """A peft LoRA adapter on `base` that approximates `tuned` (mergekit's extract_lora, in small): each
    attention and MLP projection's difference truncated to its top `rank` singular directions."""
    from safetensors.torch import load_file

    b, t = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tensors = {}
    for name in sorted(b):
        if name.endswith(".weight") and name.split(".")[-2] in targets:
            u, s, vh = torch.linalg.svd((t[name] - b[name]).float(), full_matrices=False)
            key = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{key}.lora_A.weight"] = (s[:rank, None] * vh[:rank]).contiguous()
            tensors[f"{key}.lora_B.weight"] = u[:, :rank].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
