"""Greedy, batched, left-padded generation with a key–value cache: the one place a reply is generated.

The copying and counting evaluation (:mod:`lens_squash.experiments.task_eval`) and the command line's
``--generate`` / demo answer both go through :func:`greedy_generate`, so a batched run gives exactly
what one-by-one runs give (a test checks it against a naive loop without a cache).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .backends import is_bridge

__all__ = ["generate_answer", "greedy_generate", "stop_ids"]


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS and the chat end-of-turn tokens it has."""
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def _left_pad(prompts: Sequence[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt.to(device)
        mask[row, width - len(prompt) :] = 1
    return tokens, mask


def _cut_at_stop(ids: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    hits = torch.isin(ids, stop).nonzero()
    return ids[: int(hits[0])] if len(hits) else ids


@torch.inference_mode()
def greedy_generate(
    model,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int = 64,
    stop_token_ids: Iterable[int] | None = None,
) -> list[torch.Tensor]:
    """Greedy continuations of 1-D token-id prompts, run as one left-padded batch.

    Pads on the left with an explicit attention mask (TransformerLens shifts absolute and rotary
    positions by it, so each row sees the positions it would see alone) and reuses a key–value cache.
    Returns each row's new ids, cut before its first stop token (default: the tokenizer's EOS and
    ``<|im_end|>``), so a batched run gives what one-by-one runs give.
    """
    from transformer_lens import TransformerLensKeyValueCache

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}; pass e.g. max_new_tokens=1")
    if not prompts or any(p.ndim != 1 or len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-D token-id tensors")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's n_ctx={model.cfg.n_ctx}; lower max_new_tokens or the task lengths, or load the model "
            "with a larger n_ctx"
        )
    stop_list = list(stop_token_ids) if stop_token_ids is not None else stop_ids(model.tokenizer)
    device = model.cfg.device
    stop = torch.tensor(stop_list, dtype=torch.long, device=device)
    pad_id = stop_list[0] if stop_list else 0  # masked out: its value never matters
    if is_bridge(model):
        return [_cut_at_stop(_uncached(model, p.to(device), max_new_tokens, stop), stop.cpu()) for p in prompts]
    tokens, mask = _left_pad(prompts, pad_id, device)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(prompts))
    logits = model(tokens, attention_mask=mask, past_kv_cache=cache)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for step in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(-1)
        steps.append(next_ids)
        finished |= torch.isin(next_ids, stop)
        if finished.all() or step == max_new_tokens - 1:
            break
        ones = torch.ones((len(prompts), 1), dtype=torch.long, device=device)
        logits = model(next_ids[:, None], attention_mask=ones, past_kv_cache=cache)
    generated = torch.stack(steps, dim=1).cpu()
    return [_cut_at_stop(row, stop.cpu()) for row in generated]


def _uncached(model, prompt: torch.Tensor, max_new_tokens: int, stop: torch.Tensor) -> torch.Tensor:
    """One prompt's greedy continuation, the whole sequence recomputed at every step: a TransformerBridge
    ignores TransformerLens's key-value cache (each cached step would see its new token alone), so each
    prompt runs unpadded and uncached, as the naive reference does."""
    tokens = prompt
    for _ in range(max_new_tokens):
        next_id = model(tokens[None])[0, -1].argmax()
        tokens = torch.cat([tokens, next_id[None]])
        if bool(torch.isin(next_id, stop)):
            break
    return tokens[len(prompt) :].cpu()


def generate_answer(model, tokens: torch.Tensor, max_new_tokens: int = 24) -> str:
    """Greedy continuation of one prompt's token ids, decoded without the prompt and special tokens."""
    new_ids = greedy_generate(model, [tokens], max_new_tokens=max_new_tokens)[0]
    return model.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
