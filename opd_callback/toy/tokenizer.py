"""Character-level tokenizers (no Hub access needed): :func:`char_tokenizer`, the one builder of the toy lab, the
tests and the benchmarks, and :func:`build_tokenizer`, the toy lab's (printable ASCII, ChatML-like chat template)."""

from __future__ import annotations

from typing import Any, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "build_tokenizer", "char_tokenizer", "EOS_TOKEN", "PAD_TOKEN", "UNK_TOKEN", "IM_START", "IM_END", "CHAT_TEMPLATE"
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN  # pad == eos on purpose (as in many real chat models)
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, UNK_TOKEN]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def char_tokenizer(
    vocab: Sequence[str],
    *,
    eos_token: str,
    pad_token: str | None = None,
    unk_token: str | None = None,
    special_tokens: Sequence[str] = (),
    chat_template: str | None = None,
    **options: Any,
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, ids in the order of ``vocab`` (which holds the special
    tokens too).

    ``pad_token`` defaults to ``eos_token``. Characters outside ``vocab`` become ``unk_token`` (with None they cannot
    be encoded); ``unk_token`` is the tokenizer's unknown token unless it is ``eos_token`` (out-of-vocabulary
    characters read as EOS). ``special_tokens`` are registered as special in the backend (never split, skipped when
    decoding with ``skip_special_tokens``); ``options`` go to ``PreTrainedTokenizerFast`` (e.g.
    ``clean_up_tokenization_spaces``, ``padding_side``).
    """
    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(vocab)}, unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    if special_tokens:
        backend.add_special_tokens(list(special_tokens))
    if unk_token is not None and unk_token != eos_token:
        options = {"unk_token": unk_token, **options}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token or eos_token, **options
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy lab's tokenizer: 4 special tokens + printable ASCII + newline (100 ids), ChatML-like chat template."""
    return char_tokenizer(
        SPECIAL_TOKENS + CHARS,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        special_tokens=SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        padding_side="right",
    )
