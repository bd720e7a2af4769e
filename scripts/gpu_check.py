"""GPU check: in-memory candidate builds against the HBM bound, and lm-eval throughput, on a ~1B Llama.

Run by scripts/gpu_check.sh on a lent GPU machine (see its header for the wheels and the call); it
needs no download and no Ray. Steps, each timed:

  1. bandwidth   HBM copy bandwidth from a large `Tensor.copy_` (bytes read + written per second)
  2. models      a Llama-shaped model of about 1B parameters built from a LlamaConfig on the GPU in bf16
                 (22 layers, d=2048, GQA 32/4 heads, MLP 5632, byte-level vocabulary of 260), and three
                 "specialists" = base + a small random perturbation, written as HF checkpoints to local disk
  3. worker      `evomerge.runtime.worker.CandidateWorker` in-process: base and sources resident on the GPU (bf16)
  4. builds      `CandidateWorker.build` for ties and dare_ties (one cold build, then timed warm builds),
                 against the bound bytes(read base + read sources + write live weights) / bandwidth
  5. evaluation  `CandidateWorker.evaluate` on a generated lm-eval task (reverse a random string,
                 loglikelihood, exact match; YAML + JSONL written to a temp dir): docs/s and tokens/s
  6. 7B          Mistral-7B shapes (32 layers, d=4096, MLP 14336, GQA 32/8, vocab 32000; 7.2B parameters),
                 a bf16 live model on the GPU and a base plus 3 random specialists generated in memory (no
                 checkpoints: they would not fit the machine's disk), merged by the worker's own code
                 (`models.live.SourceTensors` + `merge_named`) with sources_on host (pinned host memory,
                 streamed per tensor, double-buffered) and device (resident in HBM): peak GPU memory,
                 ties / task_arithmetic build time against the PCIe bound (host: (E + 1) x 2 bytes per
                 parameter over the link) and the HBM bound (device: read base and sources, write the live
                 weights), and lm-eval tokens/s on the 7B live model. It must fit an 80 GB H100.

Writes gpu_check.json to --out ($OUT on the device machine). `--smoke` runs the same steps on a tiny
model on the CPU in a few seconds (the check of this script where there is no GPU).

    bash scripts/gpu_check.sh                           # on the GPU machine (8 minutes at most)
    python scripts/gpu_check.py --smoke --out /tmp/gc   # here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "gpu_check_rev"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class Plan:
    shape: Shape
    copy_mib: int  # size of each buffer in the bandwidth copy
    docs: int  # examples per split of the generated task
    prompt_chars: int
    warm_builds: int
    batch_size: int


FULL = Plan(Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4), copy_mib=2048, docs=2000,
            prompt_chars=48, warm_builds=3, batch_size=128)
SMOKE = Plan(Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2), copy_mib=16, docs=16,
             prompt_chars=12, warm_builds=1, batch_size=16)
LARGE = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8)  # Mistral-7B
LARGE_SMOKE = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
LARGE_VOCAB = 32000


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 1. bandwidth -------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, mib: int, reps: int = 10) -> dict:
    """Bytes read + written per second by dst.copy_(src) on two `mib`-MiB buffers."""
    n = mib * 2**20 // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    seconds = (time.perf_counter() - started) / reps
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return {"buffer_mib": mib, "seconds_per_copy": seconds, "bytes_per_copy": moved, "gb_per_s": moved / seconds / 1e9}


# --- 2. models ----------------------------------------------------------------------------------


def write_models(folder: Path, shape: Shape, device: torch.device, n_specialists: int = 3) -> dict:
    """A random base Llama in bf16 and `n_specialists` perturbed copies, as HF checkpoint folders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo import char_tokenizer

    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    sync(device)
    init_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    paths = {"base": folder / "base"}
    started = time.perf_counter()
    model.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(1)
    for i in range(n_specialists):
        # a "fine-tune": every weight moved by about 1% of its tensor's spread, a different direction each
        state = {k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=gen, device=device)).to(v.dtype)
                 for k, v in base_state.items()}
        paths[f"spec{i}"] = folder / f"spec{i}"
        model.save_pretrained(paths[f"spec{i}"], state_dict=state)
        tokenizer.save_pretrained(paths[f"spec{i}"])
        del state
    write_s = time.perf_counter() - started
    del model, base_state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    disk = sum(f.stat().st_size for p in paths.values() for f in p.glob("*.safetensors"))
    return {"paths": {k: str(v) for k, v in paths.items()}, "n_params": n_params, "init_s": init_s,
            "write_s": write_s, "checkpoint_bytes": disk, "config": asdict(shape), "vocab": len(tokenizer)}


# --- 5. the generated lm-eval task --------------------------------------------------------------


def write_task(folder: Path, docs: int, prompt_chars: int) -> Path:
    """An lm-eval task like the zoo's zoo_rev: "abc>" -> "cba\\n", loglikelihood, exact match (acc)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split in ("fitness", "heldout"):
        with (folder / f"{split}.jsonl").open("w") as fh:
            for _ in range(docs):
                text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(prompt_chars))
                fh.write(json.dumps({"prompt": f"{text}>", "target": f"{text[::-1]}\n"}) + "\n")
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    fitness: {folder / 'fitness.jsonl'}
    heldout: {folder / 'heldout.jsonl'}
output_type: loglikelihood
test_split: heldout
doc_to_text: prompt
doc_to_target: target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


# --- 3-5. the worker ----------------------------------------------------------------------------


def recipes(paths: dict[str, str], n_sources: int) -> dict:
    from evomerge.recipe import Recipe

    sources = tuple(paths[f"spec{i}"] for i in range(n_sources))
    params = {"weight": tuple(0.5 + 0.1 * i for i in range(n_sources)), "density": tuple(0.5 for _ in range(n_sources))}
    return {m: Recipe(m, paths["base"], sources, (params,), seed=0) for m in ("ties", "dare_ties")}


def build_bytes(worker) -> int:
    """Bytes one build must move at least: read base and sources once, write the live weights."""
    from evomerge.recipe import Recipe

    live = worker.builder(Recipe)
    inputs = live.inputs
    return sum(t.nbytes + sum(s.nbytes for s in (inputs.base[n], *inputs.sources[n])) for n, t in live.live.items())


def time_builds(worker, recipe, warm: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak = resident sources + live model + this method's temporaries
    cold = worker.build(recipe)
    times = [worker.build(recipe) for _ in range(warm)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"cold_s": cold, "warm_s": times, "warm_median_s": statistics.median(times), "peak_gib": peak}


def run_worker(models: dict, task_dir: Path, plan: Plan, device: torch.device, bandwidth: dict) -> dict:
    from evomerge.config import TaskConfig
    from evomerge.runtime.messages import WorkerSetup
    from evomerge.runtime.worker import CandidateWorker

    paths = models["paths"]
    n_sources = len(paths) - 1
    setup = WorkerSetup(base=paths["base"], sources=tuple(paths[f"spec{i}"] for i in range(n_sources)),
                        tasks=(TaskConfig(name=TASK),), include_paths=(str(task_dir),), batch_size=plan.batch_size,
                        dtype="bfloat16", device=str(device), sources_on="device")
    worker = CandidateWorker(setup)
    log(f"worker ready in {worker.startup_s:.1f}s on {worker.device}")
    moved = build_bytes(worker)
    bound_s = moved / (bandwidth["gb_per_s"] * 1e9)
    out = {"startup_s": worker.startup_s, "bytes_per_build": moved, "bound_s": bound_s, "builds": {}, "eval": {}}
    for method, recipe in recipes(paths, n_sources).items():
        b = time_builds(worker, recipe, plan.warm_builds, device)
        b["bound_ratio"] = b["warm_median_s"] / bound_s  # 1.0 = as fast as the copy bandwidth allows
        out["builds"][method] = b
        log(f"build {method}: cold {b['cold_s']:.3f}s, warm median {b['warm_median_s']:.3f}s "
            f"= {b['bound_ratio']:.1f}x the bound {bound_s * 1000:.1f} ms")
    tokens = doc_tokens(task_dir, worker.tokenizer)
    for i, recipe in enumerate([*recipes(paths, n_sources).values()] * 2):
        result = worker.evaluate(recipe, "fitness")  # the first builds HFLM around the live model
        out["eval"][f"candidate{i}"] = {"method": recipe.method, "merge_s": result.merge_s, "eval_s": result.eval_s,
                                        "acc": result.fitness, "docs_per_s": plan.docs / result.eval_s,
                                        "tokens_per_s": tokens / result.eval_s, "peak_mem_mb": result.peak_mem_mb}
        log(f"candidate {i} ({recipe.method}): merge {result.merge_s:.3f}s eval {result.eval_s:.3f}s "
            f"= {plan.docs / result.eval_s:.0f} docs/s, {tokens / result.eval_s:.0f} tokens/s")
    out["docs"], out["tokens"] = plan.docs, tokens
    return out


# --- 6. the 7B-shaped case ---------------------------------------------------------------------


class GeneratedSources:
    """Base (i = 0) or specialist i of a model, generated tensor by tensor on the device: what
    `SourceTensors` reads from a checkpoint, here from memory (a 7B x 4 set would not fit on disk)."""

    def __init__(self, live: dict[str, torch.Tensor], i: int) -> None:
        self.live, self.i, self.names = live, i, list(live)

    def tensor(self, name: str) -> torch.Tensor:
        base = self.live[name]
        if not self.i:
            return base.clone()
        gen = torch.Generator(device=base.device).manual_seed(1000 * self.i + len(name))
        noise = torch.randn(base.shape, generator=gen, device=base.device, dtype=torch.float32)
        return (base.float() + 0.002 * noise).to(base.dtype)


def run_large(shape: Shape, device: torch.device, plan: Plan, bandwidth: dict, task_dir: Path, n_sources: int = 3) -> dict:
    """Step 6: a 7B-shaped merge in host and device modes, and lm-eval throughput on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.config import TaskConfig
    from evomerge.models.build import check_recipe, group_map, merge_named
    from evomerge.models.live import SourceTensors
    from evomerge.merge import TaskVectors
    from evomerge.recipe import Recipe
    from evomerge.runtime.scoring import LmEvalScorer
    from evomerge.zoo import char_tokenizer

    config = LlamaConfig(vocab_size=LARGE_VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    live = dict(model.state_dict())
    n_params = sum(t.numel() for t in live.values())
    live_bytes = sum(t.nbytes for t in live.values())
    out: dict = {"n_params": n_params, "live_bytes": live_bytes, "modes": {}}
    log(f"7B: {n_params / 1e9:.2f}B parameters, live model {live_bytes / 2**30:.1f} GiB")
    sources = tuple(f"spec{i}" for i in range(n_sources))
    params = {"weight": [0.9, 0.6, 0.7][:n_sources], "density": [0.4, 0.5, 0.6][:n_sources]}

    base_header = SimpleNamespace(names=list(live), config=config.to_dict())  # what group_map reads
    devices = {n: t.device for n, t in live.items()}
    for mode in ("host", "device"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        inputs = SourceTensors(GeneratedSources(live, 0), [GeneratedSources(live, i + 1) for i in range(n_sources)], mode, devices)
        sync(device)
        row: dict = {"setup_s": time.perf_counter() - started, "builds": {}}
        for method in ("ties", "task_arithmetic"):
            recipe = Recipe(method, "base", sources, ({k: v for k, v in params.items() if method == "ties" or k == "weight"},), seed=0)
            spec, groups = check_recipe(recipe), group_map(recipe, base_header)
            times = []
            for _ in range(plan.warm_builds + 1):
                started = time.perf_counter()
                with torch.no_grad():
                    for name, base, srcs in inputs.each():
                        merge_named(recipe, spec, name, groups[name], base, TaskVectors(base, srcs), out=live[name])
                sync(device)
                times.append(time.perf_counter() - started)
            row["builds"][method] = {"cold_s": times[0], "warm_median_s": statistics.median(times[1:])}
        moved = (n_sources + 1) * live_bytes
        row["bound_s"] = moved / 50e9 if mode == "host" else (moved + live_bytes) / (bandwidth["gb_per_s"] * 1e9)
        row["bound"] = "PCIe at 50 GB/s: base and sources over the link once" if mode == "host" else \
            "HBM copy bandwidth: read base and sources, write the live weights"
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out["modes"][mode] = row
        log(f"7B {mode}: peak {row['peak_gib']} GiB; " + ", ".join(
            f"{m} {b['warm_median_s']:.2f}s ({b['warm_median_s'] / row['bound_s']:.1f}x bound)" for m, b in row["builds"].items()))
        del inputs
    tokenizer = char_tokenizer()
    scorer = LmEvalScorer([TaskConfig(name=TASK, limit=plan.docs // 4)], [str(task_dir)], batch_size=plan.batch_size,
                          device=str(device))
    scorer.score(model, tokenizer, "fitness")  # builds HFLM, warms up
    started = time.perf_counter()
    scorer.score(model, tokenizer, "fitness")
    eval_s = time.perf_counter() - started
    tokens = doc_tokens(task_dir, tokenizer, plan.docs // 4)
    out["eval"] = {"docs": plan.docs // 4, "eval_s": eval_s, "tokens_per_s": tokens / eval_s}
    log(f"7B eval: {plan.docs // 4} docs in {eval_s:.1f}s = {tokens / eval_s:.0f} tokens/s")
    return out


def doc_tokens(task_dir: Path, tokenizer, limit: int | None = None) -> int:
    """Tokens the model reads for the fitness split: <bos> + prompt + target per doc."""
    lines = (task_dir / "fitness.jsonl").read_text().splitlines()[:limit]
    return sum(len(tokenizer(json.loads(l)["prompt"] + json.loads(l)["target"])["input_ids"]) for l in lines)


# --- main ---------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(device)}
    try:
        import lm_eval

        info["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError as exc:
        info["lm_eval"] = f"missing: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few seconds")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--skip-7b", action="store_true", help="skip step 6, the 7B-shaped case")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        print("gpu_check: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report: dict = {"smoke": args.smoke, "plan": asdict(plan), "env": environment(device)}
    log(f"env: {report['env']}")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work))
    try:
        report["bandwidth"] = copy_bandwidth(device, plan.copy_mib)
        log(f"copy bandwidth: {report['bandwidth']['gb_per_s']:.0f} GB/s (read + written)")
        report["models"] = write_models(work / "models", plan.shape, device)
        log(f"models: {report['models']['n_params'] / 1e9:.3f}B params; init {report['models']['init_s']:.1f}s, "
            f"4 checkpoints written in {report['models']['write_s']:.1f}s")
        task_dir = write_task(work / "task", plan.docs, plan.prompt_chars)
        report["worker"] = run_worker(report["models"], task_dir, plan, device, report["bandwidth"])
        shutil.rmtree(work / "models", ignore_errors=True)  # the disk space the 7B case may need for its temporaries
        if not args.skip_7b:
            report["large"] = run_large(LARGE_SMOKE if args.smoke else LARGE, device, plan, report["bandwidth"], task_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report["total_s"] = time.perf_counter() - started
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.out / 'gpu_check.json'} after {report['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
