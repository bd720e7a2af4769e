"""The merged vocabulary: each model's embedding and head rows laid out by token, as mergekit 0.1.5 does.

    plan = plan_vocab(spec, [(base_ref, base), (src_ref, src), ...])    # None: rows merge by index
    base_rows, *source_rows = plan.align([base_t, *source_ts])          # (plan.size, *rest) each

`resolve_spec` turns a recipe's `TokenizerSpec` (None: the default) into the one that applies to these
models; `plan_vocab` builds the merged tokenizer once (mergekit's `build_tokenizer`: the union, the base's,
or a named model's, plus the `tokens` it lists) and, per model, the row each merged token comes from
(mergekit's permutations). A token a model lacks, or a forced one, takes the `Fill` mergekit's
`PermutedVocabulary` gives it: one model's row, a mean of several, or zeros. `align` applies that to one
tensor name's inputs; workers call it once per vocabulary tensor at start-up, exports once per tensor.

Arithmetic: mergekit computes those means in the inputs' (cast) dtype; `align(compute=None)` computes
them in fp32 and rounds once to the inputs' promoted dtype (evomerge's arithmetic), `compute=dtype`
does what mergekit does in that dtype (`--arithmetic mergekit`). Rows copied from a model are exact
either way. Orders: the union adds other models' tokens in the order base, sources (mergekit's order is
a Python set's, which varies between runs when two sources add different tokens), ordinary tokens by
their id in the model that has them, added tokens after them.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.models.headers import CheckpointHeader, resolve_model, vocab_names, vocab_size
from evomerge.recipe.tokenizer import TokenizerSpec, TokenSetting

Fill = tuple[tuple[int, int], ...]  # (model index, row) pairs: one is a copy, several a mean, none zeros


@dataclass
class VocabPlan:
    """The merged vocabulary and where each model's rows for it come from (module docstring).

    Resident: the tokenizer, and 8 bytes per token per model (the row indices); nothing per parameter.
    """

    tokenizer: Any  # the merged model's transformers tokenizer
    n_tokens: int  # len(tokenizer.get_vocab())
    size: int  # rows of the merged embeddings: n_tokens padded to pad_to_multiple_of
    rows: list[torch.Tensor]  # per model (base first): (n_tokens,) int64, the model's row for each token or -1
    forced: torch.Tensor  # (n_tokens,) bool: tokens every model takes from its fill
    fills: dict[int, Fill]  # token id -> what models without the token (all, when forced) take
    names: frozenset[str]  # the tensors whose rows are tokens (embeddings, head)

    def align(self, tensors: Sequence[torch.Tensor], compute: torch.dtype | None = None) -> list[torch.Tensor]:
        """Each model's tensor (base first) with its rows laid out by the merged vocabulary, (size, *rest):
        with `compute` None in its own dtype, fills computed in fp32 and rounded once; else all in
        `compute`, fills computed in it (mergekit)."""
        work = compute or torch.float32
        values = {i: _fill_value(fill, tensors, work) for i, fill in self.fills.items()}
        return [self._laid_out(m, t, values, compute or t.dtype, work) for m, t in enumerate(tensors)]

    def _laid_out(self, model: int, tensor: torch.Tensor, values: dict[int, torch.Tensor], dtype: torch.dtype,
                  work: torch.dtype) -> torch.Tensor:
        rows = self.rows[model].to(tensor.device)
        own = (rows >= 0) & ~self.forced.to(tensor.device)
        out = torch.zeros((self.size, *tensor.shape[1:]), dtype=dtype, device=tensor.device)
        out[:self.n_tokens][own] = tensor[rows[own]].to(dtype)
        for token, value in values.items():
            if not own[token]:
                out[token] = value.to(dtype)
        if self.size > self.n_tokens:  # padding rows: the mean of the real ones (mergekit, after Hewitt 2021)
            out[self.n_tokens:] = out[:self.n_tokens].to(work).mean(0).to(dtype)
        return out


def promoted_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype mergekit computes a tensor's inputs in when its config names none."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _fill_value(fill: Fill, tensors: Sequence[torch.Tensor], work: torch.dtype) -> torch.Tensor:
    """mergekit's default embedding: zeros, one row, or the mean of rows summed in model order, in `work`."""
    value = torch.zeros(tensors[0].shape[1:], dtype=work, device=tensors[0].device)
    for model, row in fill:
        value = value + tensors[model][row].to(work)
    return value / len(fill) if len(fill) > 1 else value


# --- which vocabulary -----------------------------------------------------------------------------


def resolve_spec(spec: TokenizerSpec | None, differs: bool) -> TokenizerSpec:
    """The spec that applies: no source given and vocabularies that differ (`headers.vocab_differs`) means the union."""
    spec = spec or TokenizerSpec()
    if spec.source is None and differs:
        return TokenizerSpec("union", spec.tokens, spec.pad_to_multiple_of, spec.chat_template)
    return spec


def plan_vocab(spec: TokenizerSpec, models: Sequence[tuple[str, CheckpointHeader]], *,
               trust_remote_code: bool = False) -> VocabPlan | None:
    """The merged vocabulary for `models` (base first), or None when rows merge by index (no source)."""
    if not spec.rebuilds:
        return None
    refs = [ref for ref, _ in models]
    tokenizers = [_tokenizer_or_none(h.path, trust_remote_code) for _, h in models]
    if tokenizers[0] is None:
        raise ModelError(f"model {refs[0]!r}: has no tokenizer that transformers can load; a tokenizer setting "
                         "needs the base's tokenizer files")
    tokenizers = [t if t is not None else tokenizers[0] for t in tokenizers]  # mergekit: assume the base's
    sizes = [vocab_size(h.config) or len(t.get_vocab()) for (_, h), t in zip(models, tokenizers)]
    _refuse_beyond_rows(refs[0], tokenizers[0], sizes[0])
    out = _output_tokenizer(spec, refs, tokenizers, sizes, trust_remote_code)
    for setting in spec.tokens:
        if setting.token not in out.get_vocab():
            out.add_tokens(setting.token)
    vocab = out.get_vocab()
    rows = [_rows(vocab, t, size) for t, size in zip(tokenizers, sizes)]
    forced, fills = _fills(spec.tokens, vocab, rows, _Models(refs, tokenizers, sizes))
    n = len(vocab)
    pad = spec.pad_to_multiple_of
    size = -(-n // pad) * pad if pad else n
    set_chat_template(out, spec.chat_template, tokenizers)
    return VocabPlan(out, n, size, rows, forced, fills, frozenset(vocab_names(models[0][1])))


def output_tokenizer(spec: TokenizerSpec, base: CheckpointHeader, sources: Sequence[CheckpointHeader], *,
                     trust_remote_code: bool = False) -> Any | None:
    """The tokenizer an export writes when rows merge by index: the base's with the spec's chat template,
    or None (the base's tokenizer files are copied as they are)."""
    if spec.chat_template is None:
        return None
    tokenizers = [_tokenizer_or_none(h.path, trust_remote_code) for h in (base, *sources)]
    if tokenizers[0] is None:
        raise ModelError(f"model {str(base.path)!r}: has no tokenizer that transformers can load, so chat_template "
                         "has nothing to go into")
    set_chat_template(tokenizers[0], spec.chat_template, [t for t in tokenizers if t is not None])
    return tokenizers[0]


def with_vocab_size(config: dict, size: int) -> dict:
    """A copy of a config.json mapping with `size` tokens (in text_config where the model keeps it there)."""
    out = dict(config)
    if "vocab_size" not in out and isinstance(out.get("text_config"), dict):
        out["text_config"] = with_vocab_size(out["text_config"], size)
    else:
        out["vocab_size"] = size
    return out


def _tokenizer_or_none(path: Path, trust_remote_code: bool) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _refuse_beyond_rows(ref: str, tokenizer: Any, rows: int) -> None:
    beyond = sorted(i for i in tokenizer.get_vocab().values() if i >= rows)
    if beyond:
        raise ModelError(f"model {ref!r}: its tokenizer has {len(beyond)} tokens at ids {beyond[0]} and up, beyond its "
                         f"{rows} embedding rows; resize its embeddings (or trim its tokenizer) before merging by token")


def _output_tokenizer(spec: TokenizerSpec, refs: list[str], tokenizers: list[Any], sizes: list[int],
                      trust_remote_code: bool) -> Any:
    """mergekit's `build_tokenizer`: the union, a copy of the base's, or the named model's tokenizer."""
    if spec.source == "union":
        return _union(tokenizers, sizes, trust_remote_code)
    if spec.source == "base":
        return _copy(tokenizers[0], trust_remote_code)
    index = model_index(spec.source, refs)
    if index is not None:
        return _copy(tokenizers[index], trust_remote_code)
    named = _tokenizer_or_none(resolve_model(spec.source), trust_remote_code)
    if named is None:
        raise ModelError(f"tokenizer source {spec.source!r}: has no tokenizer that transformers can load")
    return named


def _copy(tokenizer: Any, trust_remote_code: bool) -> Any:
    """A tokenizer that can be changed without changing `tokenizer` (saved and reloaded, as mergekit does)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)


def _union(tokenizers: list[Any], sizes: list[int], trust_remote_code: bool) -> Any:
    """mergekit's `build_union_tokenizer`: the base's tokenizer, plus each other token (plain ones first, by
    id within each model), plus every model's added tokens (as they were added: special or not)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, size in zip(tokenizers, sizes):
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if index < size:
                plain.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index < size:
                added.setdefault(info.content, info)
    out = _copy(tokenizers[0], trust_remote_code)
    base_vocab = tokenizers[0].get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def model_index(ref: str | None, refs: Sequence[str]) -> int | None:
    """The index of model `ref` among `refs` (as written, or the same folder), or None."""
    if ref is None:
        return None
    if ref in refs:
        return list(refs).index(ref)
    try:
        folder = resolve_model(ref)
    except ModelError:
        return None
    for i, other in enumerate(refs):
        try:
            if resolve_model(other) == folder:
                return i
        except ModelError:
            continue
    return None


def _rows(vocab: dict[str, int], tokenizer: Any, size: int) -> torch.Tensor:
    """(len(vocab),) the model's row of each merged token, -1 where the model lacks it (or its id is past its rows)."""
    own = tokenizer.get_vocab()
    rows = torch.full((len(vocab),), -1, dtype=torch.int64)
    for token, index in vocab.items():
        row = own.get(token, -1)
        rows[index] = row if row < size else -1
    return rows


@dataclass(frozen=True)
class _Models:
    """The merged models as `_fills` needs them: references, tokenizers and row counts, base first."""

    refs: list[str]
    tokenizers: list[Any]
    sizes: list[int]

    def distinct(self) -> list[int]:
        """Indices of the models, each once (a base that is also a source is one model, as in mergekit)."""
        return [m for m, ref in enumerate(self.refs) if ref not in self.refs[:m]]


def _fills(settings: Sequence[TokenSetting], vocab: dict[str, int], rows: list[torch.Tensor],
           models: _Models) -> tuple[torch.Tensor, dict[int, Fill]]:
    """mergekit's `assign_embedding_sources` and default embeddings: a fill for every token that some model
    lacks or that is forced; `forced` marks the forced ones."""
    configured = {vocab[s.token]: s for s in settings}
    distinct = models.distinct()
    present = torch.stack([rows[m] for m in distinct]) >= 0  # (distinct models, n_tokens)
    forced = torch.zeros(len(vocab), dtype=torch.bool)
    forced[[i for i, s in configured.items() if s.force]] = True
    fills: dict[int, Fill] = {}
    lacking = (~present.all(0)).nonzero().flatten().tolist()  # a Python loop over these only: big vocabularies are fast
    for index in sorted({*lacking, *(i for i, s in configured.items() if s.force)}):
        have = [m for k, m in enumerate(distinct) if present[k, index]]
        setting = configured.get(index)
        fills[index] = _auto_fill(have, rows, index) if setting is None else _configured_fill(setting, index, rows, models)
    return forced, fills


def _auto_fill(have: list[int], rows: list[torch.Tensor], index: int) -> Fill:
    """The one model that has the token; else zeros; else the base (model 0) when it has it; else the mean."""
    if len(have) == 1 or have[:1] == [0]:
        return ((have[0], int(rows[have[0]][index])),)
    return tuple((m, int(rows[m][index])) for m in have)


def _configured_fill(setting: TokenSetting, index: int, rows: list[torch.Tensor], models: _Models) -> Fill:
    """A `tokens:` entry's source: zeros, the named model's row for this token, or for another token or id."""
    source = setting.source
    where = f"tokenizer.tokens[{setting.token!r}]"
    if source is None:
        raise ConfigError(f"{where}: some model lacks this token (or force is set) and it has no source; give "
                          "source: a model, {kind: model_token, model: REF, token: T}, or {kind: zero}")
    if source.zero:
        return ()
    model = model_index(source.model, models.refs)
    if model is None:
        raise ConfigError(f"{where}.source: model {source.model!r} is not one of the merged models; name the base or a source")
    if source.token is None and source.token_id is None:
        row = int(rows[model][index])
        if row < 0:
            raise ConfigError(f"{where}.source: model {source.model!r} has no token {setting.token!r}; name a model that has it")
        return ((model, row),)
    row = source.token_id if source.token_id is not None else models.tokenizers[model].get_vocab().get(source.token, -1)
    if not 0 <= row < models.sizes[model]:
        what = f"token_id {source.token_id}" if source.token_id is not None else f"token {source.token!r}"
        raise ConfigError(f"{where}.source: model {source.model!r} has no row for {what}; give a token it has")
    return ((model, row),)


def set_chat_template(tokenizer: Any, template: str | None, tokenizers: Sequence[Any]) -> None:
    """mergekit's chat_template: "auto" (the most common template among the models' tokenizers), or a Jinja text."""
    if template is None:
        return
    if template == "auto":
        found = [t.chat_template.get("default") if isinstance(t.chat_template, dict) else t.chat_template for t in tokenizers]
        found = [t.strip() for t in found if t]
        if found:
            tokenizer.chat_template = collections.Counter(found).most_common(1)[0][0]
        return
    if len(template) < 20 or "{" not in template:
        raise ConfigError(f"chat_template = {template!r}: evomerge takes auto or a Jinja template text (mergekit's bundled "
                          "template names chatml, llama3, alpaca, mistral, exaone are not shipped); paste the template")
    tokenizer.chat_template = template
