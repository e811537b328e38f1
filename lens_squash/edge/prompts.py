"""Prompts as the model sees them: the chat template (instruction models answer properly only inside
it) or raw text, refused when empty or longer than the loaded context, never cut.

A prompt becomes a :class:`Tokens` value once, at the boundary (:func:`tokenize`): the token ids, their
strings, whether the chat template was applied and the source text travel together from there on, so
no inner function takes ``(prompt, chat=...)`` again or tokenizes a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ..core import validate
from ..core.validate import check_chat

__all__ = ["Tokens", "as_tokens", "check_length", "format_prompt", "tokenize", "uses_chat"]


@dataclass(frozen=True, eq=False)
class Tokens:
    """One prompt as the model sees it, made by :func:`tokenize`.

    ``ids`` are the token ids ``[pos]`` (int64, on the CPU), ``str_tokens`` their strings (the ids as
    text when the model has no tokenizer), ``chat`` whether the chat template was applied (``None``
    when ids were given: nobody here knows how they were made) and ``text`` the source text (``None``
    for ids).
    """

    ids: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    chat: bool | None = None
    text: str | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def upto(self, target_pos: int) -> Tokens:
        """The positions ``0..target_pos``: all a causal model's position ``target_pos`` can see."""
        end = target_pos + 1
        return Tokens(self.ids[:end], self.str_tokens[:end], chat=self.chat, text=self.text)


def tokenize(model, prompt: str | Tensor | Tokens, *, chat: bool | None = None) -> Tokens:
    """The one conversion of a prompt into :class:`Tokens`, checked before any forward pass.

    ``prompt`` is text (chat template unless ``chat=False``, :func:`uses_chat`), a 1-D or ``[1, pos]``
    id tensor (or numpy array), or a :class:`Tokens` value (checked against this model and returned
    as it is; ``chat`` must then be ``None`` or say what the value says). Refused: the wrong type, no
    tokens, ids outside the vocabulary, more tokens than the loaded context.
    """
    from .models import check_model  # models imports this module: a top-level import would be a cycle

    check_model(model)
    check_chat(chat)
    if isinstance(prompt, Tokens):
        return _checked_tokens(model, prompt, chat)
    prompt = validate.check_prompt(prompt)
    if isinstance(prompt, str):
        ids = format_prompt(model, prompt, chat=chat)  # refuses a model without a tokenizer
        return Tokens(ids, str_tokens(model, ids), chat=uses_chat(model.tokenizer, chat=chat), text=prompt)
    ids = validate.check_token_ids(prompt, model.cfg.d_vocab)
    check_length(model, ids.shape[0])
    return Tokens(ids, str_tokens(model, ids))


def as_tokens(model, prompt: str | Tensor | Tokens, *, chat: bool | None = None) -> Int[Tensor, "pos"]:
    """The token ids of :func:`tokenize` (for callers that need nothing else)."""
    return tokenize(model, prompt, chat=chat).ids


def str_tokens(model, ids: Int[Tensor, "pos"]) -> tuple[str, ...]:
    """Each id decoded on its own (the ids as text when the model has no tokenizer)."""
    if model.tokenizer is None:
        return tuple(str(int(t)) for t in ids)
    return tuple(model.to_str_tokens(ids))


def _checked_tokens(model, tokens: Tokens, chat: Any) -> Tokens:
    """A :class:`Tokens` value made elsewhere: its ids must fit this model, and ``chat`` must agree."""
    if chat is not None and tokens.chat is not None and chat != tokens.chat:
        raise ValueError(
            f"chat={chat} contradicts the Tokens value, which was made with chat={tokens.chat}; "
            "pass chat=None with a Tokens value, or tokenize the text again"
        )
    validate.check_token_ids(tokens.ids, model.cfg.d_vocab)
    check_length(model, len(tokens))
    return tokens


def format_prompt(
    model,
    text: str,
    *,
    chat: bool | None = None,
    prepend_bos: bool | None = None,
) -> torch.Tensor:
    """Token ids ``[pos]`` for ``text``, ready for the model.

    ``chat=None`` applies the tokenizer's chat template when it has one (instruction models answer
    properly only inside it); ``chat=False`` tokenizes the raw text. The chat template already opens
    with the BOS token, so no second one is added; raw text gets the model's default BOS handling
    unless ``prepend_bos`` says otherwise.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the prompt is empty; pass some text (e.g. the paper's copying prompt)")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass token ids instead of text")
    use_chat = uses_chat(tokenizer, chat=chat)
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; call with chat=False for raw text")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        # truncate=False: TransformerLens would otherwise cut the prompt to n_ctx without a word
        tokens = model.to_tokens(text, prepend_bos=bos, truncate=False)[0].cpu()
    check_length(model, tokens.shape[-1])
    return tokens


def check_length(model, n_tokens: int) -> None:
    """Refuse prompts that are empty or longer than the model's context, saying how to fix it."""
    if n_tokens == 0:
        raise ValueError("the prompt has no tokens; pass a non-empty prompt")
    if n_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"the prompt has {n_tokens} tokens but the model was loaded with n_ctx={model.cfg.n_ctx}; "
            "shorten the prompt or load the model with a larger n_ctx (load_model(..., n_ctx=...) in "
            "Python, --n-ctx on the command line), up to the model's trained context"
        )


def uses_chat(tokenizer, *, chat: bool | None) -> bool:
    """What ``chat`` means everywhere in lens_squash: ``True`` the chat template, ``False`` raw text,
    ``None`` (the default) the chat template when the tokenizer has one."""
    check_chat(chat)
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
