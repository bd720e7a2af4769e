"""Tiny causal LMs of three families, the few-line training loop that makes the zoo, and the exact-match
check that stops it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from evomerge.zoo._data import Example
from evomerge.zoo._tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, encode_line

MAX_POSITIONS = 64  # longest zoo line is 15 tokens; 64 leaves room for few-shot prompts


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    hidden: int
    n_heads: int
    intermediate: int


def new_model(family: str, shape: ModelShape) -> PreTrainedModel:
    """A randomly initialised model of `family` (llama | qwen2 | gpt2); init draws from torch's global RNG."""
    common = dict(vocab_size=len(VOCAB), bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if family == "llama":
        config = LlamaConfig(
            hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_heads,
            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **common,
        )
        return LlamaForCausalLM(config)
    if family == "qwen2":  # q/k/v projections carry biases in this family
        config = Qwen2Config(
            hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads, num_key_value_heads=max(1, shape.n_heads // 2),
            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, use_sliding_window=False, **common,
        )
        return Qwen2ForCausalLM(config)
    if family == "gpt2":  # transformer.h.N naming, fused c_attn, tied embeddings
        config = GPT2Config(
            n_embd=shape.hidden, n_layer=shape.n_layers, n_head=shape.n_heads, n_inner=shape.intermediate,
            n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown zoo family {family!r}; known families: llama, qwen2, gpt2")


def batches(
    examples: Iterator[Example], batch_size: int, *, prompt_loss: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels), both (B, T): one example per row, right-padded. Labels are -100 on padding,
    and on the prompt too unless prompt_loss (then the loss covers only the target: SFT-style)."""
    while True:
        exs = [next(examples) for _ in range(batch_size)]
        rows = [encode_line(ex.line) for ex in exs]
        ids = torch.full((batch_size, max(map(len, rows))), PAD_ID, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, (ex, row) in enumerate(zip(exs, rows)):
            ids[i, : len(row)] = torch.tensor(row)
            start = 1 if prompt_loss else 1 + len(ex.prompt)  # position 0 is <bos>: never a label
            labels[i, start : len(row)] = ids[i, start : len(row)]
        yield ids, labels


@dataclass(frozen=True)
class Schedule:
    steps: int  # the step cap where training stops at a target, else the length
    lr: float
    warmup_steps: int = 0
    cosine: bool = False  # decay to 10% of lr after warmup; constant otherwise

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.cosine:
            return self.lr
        done = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


@dataclass(frozen=True)
class Trained:
    steps: int  # steps run: fewer than the schedule's when `done` stopped it
    loss: float  # smoothed (an exponential moving average over ~10 steps)


def train(
    model: PreTrainedModel,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    schedule: Schedule,
    report: Callable[[int, float], None],
    n_reports: int = 10,
    *,
    done: Callable[[], bool] | None = None,
    check_every: int = 25,
) -> Trained:
    """AdamW on the next-token loss, calling report(step, loss) n_reports times. With `done`, asks it
    every check_every steps (model in eval mode) and stops at the first True: a fine-tune that ends at
    a skill level, not at a step count, lands at the same skill on every machine."""
    report_every = max(1, schedule.steps // n_reports)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)
    loss_ema, step = float("nan"), 0
    while step < schedule.steps:
        loss = _step(model, opt, next(data), schedule.lr_at(step))
        step += 1
        loss_ema = loss if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss
        reported = step % report_every == 0 or step == schedule.steps
        if reported:
            report(step, loss_ema)
        if done is not None and step % check_every == 0 and _checked(model, done):
            if not reported:
                report(step, loss_ema)
            break
    model.eval()
    return Trained(step, loss_ema)


def _step(model: PreTrainedModel, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], lr: float) -> float:
    """One AdamW step at learning rate lr on one (input_ids, labels) batch; returns its loss."""
    ids, labels = batch
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    logits = model(input_ids=ids, attention_mask=ids.ne(PAD_ID)).logits  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _checked(model: PreTrainedModel, done: Callable[[], bool]) -> bool:
    model.eval()
    return done()


@torch.no_grad()
def exact_match(model: PreTrainedModel, examples: list[Example]) -> float:
    """Share of examples whose target (answer + end marker) is the greedy continuation of the prompt:
    what the zoo tasks' lm-eval `acc` (is_greedy) measures, in one batched forward pass."""
    rows = [encode_line(ex.line) for ex in examples]
    ids = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)  # (N, T), right-padded
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    greedy = model(input_ids=ids, attention_mask=ids.ne(PAD_ID)).logits.argmax(-1)  # (N, T): token t + 1
    hits = 0
    for i, ex in enumerate(examples):
        start, end = len(encode_line(ex.prompt)), len(rows[i])  # the first target position; one past the last
        hits += bool(torch.equal(greedy[i, start - 1 : end - 1], ids[i, start:end]))
    return hits / len(examples)
