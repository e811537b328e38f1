"""Prompts as the model sees them: the chat template (instruction models answer properly only inside
it) or raw text, refused when empty or longer than the loaded context, never cut.
"""

from __future__ import annotations

import torch

from ..core.validate import check_chat

__all__ = ["check_length", "format_prompt", "uses_chat"]


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
    use_chat = uses_chat(tokenizer, chat)
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


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """What ``chat`` means everywhere in lens_squash: ``True`` the chat template, ``False`` raw text,
    ``None`` (the default) the chat template when the tokenizer has one."""
    check_chat(chat)
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
