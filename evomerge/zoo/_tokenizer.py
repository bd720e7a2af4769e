"""A byte-level character tokenizer: one token per UTF-8 byte (so one per ASCII char), plus four specials.

It is a byte-level BPE with no merges, GPT-2 style, because transformers 5 rebuilds the tokenizer of
some model types from vocab + merges under its own byte-level pre-tokenizer (Qwen2 always gets
Qwen2Tokenizer, whatever tokenizer.json says): only a byte-level vocabulary survives that unchanged.
Char-level encoding is prefix-consistent (encode("a") + encode("b") == encode("ab") after the BOS),
which lm-eval's loglikelihood relies on when it splits context from continuation.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable-symbol table (byte b is shown as table[b]; e.g. " " -> "Ġ", "\\n" -> "Ċ")."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_SYMBOLS = _bytes_to_unicode()
VOCAB = {tok: i for i, tok in enumerate([*SPECIALS, *BYTE_SYMBOLS])}
_BYTE_ID0 = len(SPECIALS)  # id of byte b = _BYTE_ID0 + b


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo's tokenizer; encode() prepends <bos> (add_special_tokens=False leaves it out)."""
    core = Tokenizer(models.BPE(vocab=VOCAB, merges=[], unk_token=UNK, fuse_unk=False))
    core.normalizer = normalizers.NFC()  # what Qwen2Tokenizer applies; a no-op on ASCII
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def encode_line(text: str) -> list[int]:
    """<bos> + one id per UTF-8 byte: what char_tokenizer().encode(text) gives, without its overhead."""
    return [BOS_ID, *(_BYTE_ID0 + b for b in text.encode("utf-8"))]
