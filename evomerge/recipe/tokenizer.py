"""The merged model's vocabulary and tokenizer, as plain data: mergekit's `tokenizer:` settings.

    TokenizerSpec(source="union")                         # every model's tokens; rows aligned by token
    TokenizerSpec(source="base", pad_to_multiple_of=64)   # the base's tokens, rows padded to a multiple
    TokenizerSpec(tokens=(TokenSetting("<|im_end|>", TokenSource(model="./instruct"), force=True),))

`source` (mergekit's `tokenizer_source` or `tokenizer.source`) says which tokens the merged model has:

- None (no setting): each model's vocabulary rows are merged by index when every model has the base's
  vocabulary shape (mergekit's behaviour without tokenizer settings); when they differ (an instruct
  fine-tune that added tokens) evomerge merges them as "union" (mergekit refuses such a config).
- "union": the base's tokens, then every token another model has (its added tokens last), in the order
  base, sources; "base": the base's tokens; a model reference: that model's tokenizer.

Before merging, each model's embedding and head rows are laid out in the merged vocabulary's order. A
token a model lacks takes (mergekit's rule) the row of the one model that has it, the base's row when
the base has it, the mean of the models that have it, or zeros when none has it; `tokens` overrides
that per token (`source`: a model's row for it or for another token, or zeros; `force`: use the source
for every model, even those that have the token). Rows added by `pad_to_multiple_of` take the mean of
the real rows. `chat_template` is mergekit's too: "auto" (the most common template among the models)
or a Jinja template text. The merge itself is `evomerge.models.vocab`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError, refuse_unknown_keys

SOURCES = ("union", "base")  # or a model reference


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from: a model's row (for this token, another `token`, or a `token_id`), or zeros."""

    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    zero: bool = False

    def __post_init__(self) -> None:
        if self.zero == (self.model is not None):
            raise ConfigError("tokenizer error: a token source is a model (model: REF) or zeros (kind: zero); give exactly one")
        if self.token is not None and self.token_id is not None:
            raise ConfigError(f"tokenizer error: source {self.model!r} gives both token and token_id; give one")

    def to_data(self) -> Any:
        if self.zero:
            return {"kind": "zero"}
        if self.token is None and self.token_id is None:
            return self.model
        out: dict[str, Any] = {"kind": "model_token", "model": self.model}
        out |= {"token": self.token} if self.token is not None else {"token_id": self.token_id}
        return out

    @classmethod
    def from_data(cls, data: Any, where: str) -> TokenSource:
        """mergekit's forms: a model reference, {kind: model_token, model, token | token_id}, {kind: zero}."""
        if isinstance(data, str):
            return cls(model=data)
        if not isinstance(data, Mapping):
            raise ConfigError(f"tokenizer error: {where} = {data!r}; give a model reference, {{kind: model_token, model: REF, "
                              "token: T}, or {kind: zero}")
        kind = data.get("kind")
        if kind == "zero":
            refuse_unknown_keys(data, ("kind",), f"tokenizer {where}")
            return cls(zero=True)
        if kind != "model_token":
            raise ConfigError(f"tokenizer error: {where}.kind = {kind!r}; use model_token or zero")
        refuse_unknown_keys(data, ("kind", "model", "token", "token_id"), f"tokenizer {where}")
        if not isinstance(data.get("model"), str):
            raise ConfigError(f"tokenizer error: {where}.model is missing; name the model whose row the token takes")
        token_id = data.get("token_id")
        if data.get("token") is None and token_id is None:
            raise ConfigError(f"tokenizer error: {where} names no token or token_id; give one of them")
        return cls(model=data["model"], token=data.get("token"), token_id=None if token_id is None else int(token_id))


@dataclass(frozen=True)
class TokenSetting:
    """mergekit's `tokenizer.tokens.<token>`: the token (added to the vocabulary if missing), its source, force."""

    token: str
    source: TokenSource | None = None
    force: bool = False

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.source is None else {"source": self.source.to_data()}
        return out | ({"force": True} if self.force else {})


@dataclass(frozen=True)
class TokenizerSpec:
    """The merged vocabulary and tokenizer (module docstring)."""

    source: str | None = None  # None, "union", "base" or a model reference
    tokens: tuple[TokenSetting, ...] = ()
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"tokenizer error: pad_to_multiple_of = {self.pad_to_multiple_of}; give a positive number of rows")
        if self.source is not None and not self.source:
            raise ConfigError("tokenizer error: source is empty; use union, base or a model reference")
        if self.force_union and self.source is None:
            object.__setattr__(self, "source", "union")  # mergekit's tokenizer block defaults to union

    @property
    def force_union(self) -> bool:
        """Settings that only a rebuilt vocabulary has (mergekit builds one whenever the block is given)."""
        return bool(self.tokens) or self.pad_to_multiple_of is not None

    @property
    def rebuilds(self) -> bool:
        """Whether the vocabulary is laid out by token (any source), not by index."""
        return self.source is not None

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.source is not None:
            out["source"] = self.source
        if self.tokens:
            out["tokens"] = {t.token: t.to_data() for t in self.tokens}
        if self.pad_to_multiple_of is not None:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    @classmethod
    def from_data(cls, data: Any, where: str = "tokenizer") -> TokenizerSpec:
        if isinstance(data, str):
            return cls(source=data)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} error: expected union, base, a model reference, or a mapping with source, tokens, "
                              "pad_to_multiple_of, chat_template")
        refuse_unknown_keys(data, ("source", "tokens", "pad_to_multiple_of", "chat_template"), where)
        tokens = data.get("tokens") or {}
        if not isinstance(tokens, Mapping):
            raise ConfigError(f"{where} error: tokens must map each token to {{source: ..., force: true|false}}")
        pad = data.get("pad_to_multiple_of")
        return cls(source=None if data.get("source") is None else str(data["source"]),
                   tokens=tuple(_setting(str(k), v, f"{where}.tokens[{k!r}]") for k, v in tokens.items()),
                   pad_to_multiple_of=None if pad is None else int(pad),
                   chat_template=None if data.get("chat_template") is None else str(data["chat_template"]))


def _setting(token: str, data: Any, where: str) -> TokenSetting:
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"tokenizer error: {where} = {data!r}; give {{source: ..., force: true|false}}")
    refuse_unknown_keys(data, ("source", "force"), f"tokenizer {where}")
    source = None if data.get("source") is None else TokenSource.from_data(data["source"], f"{where}.source")
    return TokenSetting(token, source, bool(data.get("force", False)))
