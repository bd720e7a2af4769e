"""Run a folder of mergekit configs through mergekit 0.1.5 and `evomerge merge`; compare the tensors.

    python scripts/mergekit_parity.py --mk-python /tmp/mkvenv/bin/python      # writes docs/results/mergekit_parity.md

mergekit needs its own environment (it pins other versions than evomerge):

    python3 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0 'mergekit==0.1.5'

The configs (`tests/data/mergekit_configs/*.yaml`: mergekit's own examples/ rewritten onto tiny models,
and an option matrix) name their models `{base}`, `{a}`, `{b}`, `{c}`, and (Llama only) `{ia}` and `{ib}`:
instruct fine-tunes that added 2 and 3 special tokens to the vocabulary (`vocab_*` configs: tokenizer
settings); a first line `# family: qwen2` picks another family than Llama. Each config runs three times: fp32 models with `dtype: float32`, bf16
models with `dtype: bfloat16`, and fp32 models with `dtype: float16` (the config's own dtype line is
replaced). evomerge runs each twice: its default arithmetic (fp32, rounded once) and `--arithmetic
mergekit` (inputs cast to the dtype, computed in it as mergekit does).

Per run the table gives each tool's outcome and, against mergekit's tensors, how many of evomerge's
tensors are bit-identical and the largest relative difference max|x - y| / max|x| over tensors.
mergekit runs in one child process of --mk-python (`--mergekit-child`), evomerge in this one.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "mergekit_configs"
OUT = ROOT / "docs" / "results" / "mergekit_parity.md"
VARIANTS = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"), "fp16": ("float32", "float16")}  # models, dtype
FAMILIES = ("llama", "qwen2", "mistral")


# --- models --------------------------------------------------------------------------------------


def make_models(root: Path) -> None:
    """Tiny base + three fine-tunes per family, in fp32 and bf16, each with a small tokenizer."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer()
    for family in FAMILIES:
        base = save_tiny(root / family / "float32" / "base", family, 0)
        for i, name in enumerate("abc"):
            save_tiny(root / family / "float32" / name, family, 10 + i, perturb_from=base)
        for name in ("base", *"abc"):
            model = AutoModelForCausalLM.from_pretrained(root / family / "float32" / name)
            model.to(torch.bfloat16).save_pretrained(root / family / "bfloat16" / name)
        for folder in (root / family).glob("*/*"):
            tokenizer.save_pretrained(folder)
    from vocab_models import extracted_adapter

    for dtype in ("float32", "bfloat16"):
        folder = root / "llama" / dtype
        for name, source, added in (("ia", "a", ADDED[:2]), ("ib", "b", ADDED)):
            add_tokens(folder / source, folder / name, added)
        extracted_adapter(folder / "base", folder / "c", folder / "lora", rank=4)


ADDED = ("<|im_start|>", "<|im_end|>", "<|tool|>")
CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"


def add_tokens(src: Path, dst: Path, added: tuple[str, ...]) -> None:
    """A copy of model `src` whose tokenizer added `added` special tokens, with that many more embedding and
    head rows (seeded, ~ 0.02 N(0, 1)), as an instruct fine-tune has; the 2-token one has a chat template."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(len(added))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = 0.02 * torch.randn(len(added), tensors[name].shape[1], generator=g)
        tensors[name] = torch.cat([tensors[name], extra.to(tensors[name].dtype)])
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + len(added)}))
    tokenizer = _tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    if len(added) == 2:
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(dst)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(60)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# --- configs -------------------------------------------------------------------------------------


def render(text: str, models: Path, variant: str) -> str:
    """The config with its model placeholders filled in and its dtype set by the variant."""
    family = re.search(r"^# family: (\w+)", text, re.M)
    folder = models / (family.group(1) if family else "llama") / VARIANTS[variant][0]
    for name in ("base", "a", "b", "c", "ia", "ib", "lora"):
        text = text.replace("{" + name + "}", str(folder / name))
    return re.sub(r"^dtype: \w+$", f"dtype: {VARIANTS[variant][1]}", text, flags=re.M)


def describe(text: str) -> tuple[str, str]:
    """(method, options) of a config for the table."""
    import yaml

    data = yaml.safe_load(text)
    options = []
    flat = json.dumps(data)
    if re.search(r"\[\s*-?[\d.]+,\s*-?[\d.]+", flat):
        options.append("gradient")
    options += sorted(set(re.findall(r'"filter": "(\w+)"', flat)))
    for key in ("normalize", "rescale", "int8_mask", "filter_wise", "lambda", "pad_to_multiple_of", "chat_template"):
        if f'"{key}"' in flat:
            options.append(key)
    source = data.get("tokenizer_source") or (data.get("tokenizer") or {}).get("source", "union" if "tokenizer" in data else None)
    if source is not None:
        options.append(f"tokenizer {source if source in ('union', 'base') else 'of a model'}")
    if "tokens" in (data.get("tokenizer") or {}):
        options.append("tokens")
    models = re.findall(r'"model": "([^"]+)"', flat)
    if any("+" in m for m in models):
        options.append("lora source")
    options.append("slices" if "slices" in data else "models")
    return data["merge_method"], ", ".join(options)


# --- running -------------------------------------------------------------------------------------


def run_mergekit(mk_python: str, jobs: list[tuple[str, str]], work: Path) -> dict[str, str]:
    """Run each (config text, out dir) with mergekit in one child process; {out: "ok" | error line}."""
    spec = work / "mergekit_jobs.json"
    spec.write_text(json.dumps(jobs))
    done = subprocess.run([mk_python, __file__, "--mergekit-child", str(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mergekit child failed:\n{done.stderr[-3000:]}")
    return json.loads((work / "mergekit_results.json").read_text())


def mergekit_child(spec_file: str) -> None:
    """Runs under the mergekit Python: every job through mergekit's own run_merge (what mergekit-yaml runs)."""
    import logging

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.disable(logging.WARNING)
    results = {}
    cache = str(Path(spec_file).parent / "mergekit-lora-cache")
    for text, out in json.loads(Path(spec_file).read_text()):
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(text))
            run_merge(config, out, MergeOptions(quiet=True, random_seed=0, lora_merge_cache=cache))
            results[out] = "ok"
        except Exception as exc:  # a refusal is a result: the table reports it
            results[out] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    (Path(spec_file).parent / "mergekit_results.json").write_text(json.dumps(results))


def run_evomerge(text: str, out: Path, arithmetic: str) -> str:
    """`evomerge merge` in this process; "ok" or the one-line error."""
    from evomerge.cli import main

    config = out.with_suffix(".yaml")
    config.write_text(text)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["merge", str(config), "--out", str(out), "--arithmetic", arithmetic, "--lora-merge-cache", str(out.parent / "evomerge-lora-cache")])
    return "ok" if code == 0 else (err.getvalue().strip().splitlines() or ["failed"])[-1].removeprefix("evomerge: ")[:160]


def compare(ours: Path, theirs: Path) -> tuple[int, int, float]:
    """(tensors bit-identical, tensors compared, max relative difference) of two checkpoint folders."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out |= load_file(f)
        return out

    a, b = tensors(ours), tensors(theirs)
    if a.keys() != b.keys():
        return 0, max(len(a), len(b)), float("inf")
    equal, worst = 0, 0.0
    for name in a:
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return 0, len(a), float("inf")
        equal += int(torch.equal(x, y) and x.dtype == y.dtype)
        scale = y.double().abs().max().clamp_min(1e-30)
        worst = max(worst, float((x.double() - y.double()).abs().max() / scale))
    return equal, len(a), worst


# --- the table -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mk-python", help="a Python with mergekit 0.1.5 (see the docstring)")
    parser.add_argument("--configs", type=Path, default=CONFIGS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--only", help="run configs whose file name contains this")
    parser.add_argument("--mergekit-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mergekit_child:
        return mergekit_child(args.mergekit_child)
    if not args.mk_python:
        raise SystemExit("give --mk-python (a Python with mergekit 0.1.5; see the docstring)")
    sys.path.insert(0, str(ROOT))
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_models(work / "models")
        files = sorted(f for f in args.configs.glob("*.yaml") if not args.only or args.only in f.name)
        runs = [(f, v, render(f.read_text(), work / "models", v)) for f in files for v in args.variants.split(",")]
        mk = run_mergekit(args.mk_python, [(text, str(work / f"mk-{f.stem}-{v}")) for f, v, text in runs], work)
        rows = [row(f, v, text, work, mk[str(work / f"mk-{f.stem}-{v}")]) for f, v, text in runs]
    write_table(rows, args.out, time.time() - started)
    print(f"wrote {args.out} ({len(rows)} runs, {time.time() - started:.0f} s)")


def row(config: Path, variant: str, text: str, work: Path, mk_outcome: str) -> dict:
    method, options = describe(text)
    # "mergekit_tool": mergekit's own outcome; "evomerge" / "mergekit": evomerge's in each arithmetic
    out = {"config": config.stem, "variant": variant, "method": method, "options": options, "mergekit_tool": mk_outcome}
    for arithmetic in ("evomerge", "mergekit"):
        target = work / f"ev-{arithmetic}-{config.stem}-{variant}"
        outcome = run_evomerge(text, target, arithmetic)
        out[arithmetic] = outcome
        if outcome == "ok" and mk_outcome == "ok":
            out[f"{arithmetic}_cmp"] = compare(target, work / f"mk-{config.stem}-{variant}")
    print(f"{config.stem:32s} {variant}: mergekit {mk_outcome[:40]:40s} evomerge {out['evomerge'][:40]} {out.get('evomerge_cmp')} "
          f"| mergekit arithmetic {out['mergekit'][:30]} {out.get('mergekit_cmp')}", flush=True)
    return out


def cell(r: dict, arithmetic: str) -> str:
    if r[arithmetic] != "ok":
        return f"refused: {r[arithmetic]}"
    if f"{arithmetic}_cmp" not in r:
        return "ok"
    equal, total, worst = r[f"{arithmetic}_cmp"]
    return f"{equal}/{total} equal, max rel {worst:.2g}"


def write_table(rows: list[dict], out: Path, seconds: float) -> None:
    both = [r for r in rows if r["mergekit_tool"] == "ok"]
    lines = [
        "# mergekit parity",
        "",
        f"`python scripts/mergekit_parity.py --mk-python /tmp/mkvenv/bin/python` ({seconds:.0f} s): {len(rows)} runs of "
        f"{len({r['config'] for r in rows})} configs (`tests/data/mergekit_configs/`) on tiny models, mergekit 0.1.5 against "
        "`evomerge merge` with its default arithmetic and with `--arithmetic mergekit`. Cells: evomerge tensors bit-identical to "
        "mergekit's / tensors, and the largest max|x - y| / max|x| over tensors.",
        "",
        summary(rows, both),
        "",
        "Deliberate differences: dare_* / della* draw their keep masks from evomerge's counter-based uniforms (mergekit "
        "from torch's generator), so their tensors differ in any arithmetic (`tests/test_mergekit_parity.py` checks the "
        "kept fraction and L1 norm instead). evomerge's default arithmetic forms fp32 task vectors and rounds once: with "
        "fp32 models it differs from mergekit by a few fp32 ulps where mergekit weights the models themselves (linear, "
        "slerp, model_stock) or sums an L1 norm in fp32 (rescale), and with `dtype: bfloat16 / float16` it is the more "
        "exact merge, not mergekit's (TIES-family trims and sign elections differ). `--arithmetic mergekit` is the parity "
        "option. Where mergekit refuses a config evomerge runs it only where the README says so: sources whose "
        "vocabularies differ, with no tokenizer settings (`vocab_no_settings`), merge as `tokenizer_source: union`.",
        "",
        "| config | models, dtype | method | options | mergekit | evomerge (default) | evomerge --arithmetic mergekit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mk = "ok" if r["mergekit_tool"] == "ok" else f"refused: {r['mergekit_tool']}"
        lines.append(f"| {r['config']} | {r['variant']} | {r['method']} | {r['options']} | {mk} | {cell(r, 'evomerge')} | {cell(r, 'mergekit')} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def summary(rows: list[dict], both: list[dict]) -> str:
    def count(arithmetic: str, test) -> int:
        return sum(1 for r in both if f"{arithmetic}_cmp" in r and test(r[f"{arithmetic}_cmp"]))

    ran = {a: sum(1 for r in rows if r[a] == "ok") for a in ("evomerge", "mergekit")}
    exact = {a: count(a, lambda c: c[0] == c[1]) for a in ("evomerge", "mergekit")}
    close = {a: count(a, lambda c: c[2] <= 2 ** -7) for a in ("evomerge", "mergekit")}
    return (
        f"mergekit ran {len(both)} / {len(rows)}; evomerge ran {ran['evomerge']} / {len(rows)}. Of the runs both tools ran, "
        f"bit-identical: {exact['evomerge']} (default arithmetic), {exact['mergekit']} (mergekit arithmetic); within bf16 rounding "
        f"(max rel <= 2^-7): {close['evomerge']} and {close['mergekit']}."
    )


if __name__ == "__main__":
    main()
