"""The model side of the training lab (:mod:`lens_squash.lab`): build, step, measure, checkpoint.

Tiny causal transformers trained from scratch on CPU: a :class:`HookedTransformer` where
TransformerLens has one (3.x), else (4.x) a ``TransformerBridge`` over the same block as a
``transformers`` GPT-NeoX model (:func:`~lens_squash.edge.tiny.tiny_model`'s twin, same init). Everything that runs or
changes a model is here, so the lab above the experiments only generates data and keeps records.
Checkpoints are one ``torch.save`` file (model and optimiser state, the config, the step and the
history so far), written atomically so a run killed mid-write resumes from the previous one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.records import atomic_write
from .backends import has_hooked_transformer, hooked_api, is_bridge
from .tiny import tiny_model

__all__ = [
    "build_lab_model",
    "lab_backend",
    "first_token_attention",
    "load_checkpoint",
    "lm_loss",
    "make_optimizer",
    "save_checkpoint",
    "train_step",
]


def build_lab_model(*, n_layers: int, d_model: int, n_heads: int, n_ctx: int, d_vocab: int, seed: int):
    """A seeded pre-LayerNorm causal transformer with rotary positions (so position 0 is not marked
    by a learned embedding of its own: a sink at 0 must come from the data). On TransformerLens 4 it
    is a bridge over the GPT-NeoX twin of that block (other weights than the hooked model's draw)."""
    if not has_hooked_transformer():
        return tiny_model(
            n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_mlp=4 * d_model, d_vocab=d_vocab, n_ctx=n_ctx,
            positional="rotary", norm="LN", act_fn="gelu", seed=seed,
        )  # fmt: skip
    HookedTransformer, HookedTransformerConfig = hooked_api()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=d_model // n_heads,
        attention_dir="causal",
        seed=seed,
        init_weights=True,
        model_name=f"lab-L{n_layers}-d{d_model}-ctx{n_ctx}",
    )
    torch.manual_seed(seed)
    return HookedTransformer(cfg)


def lab_backend(model) -> str:
    """``"bridge"`` or ``"hooked"``: checkpoints record it, as the two hold different state-dict keys."""
    return "bridge" if is_bridge(model) else "hooked"


def make_optimizer(model, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def lm_loss(model, tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """Mean next-token cross-entropy over every position of every row."""
    return model(tokens, return_type="loss")


def train_step(model, optimizer: torch.optim.Optimizer, tokens: Int[Tensor, "batch pos"], lr: float) -> float:
    """One AdamW step at learning rate ``lr`` (clipped at gradient norm 1); returns the loss before it."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model, tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    model.eval()
    return float(loss.detach())


def first_token_attention(model, tokens: Int[Tensor, "batch pos"]) -> tuple[Float[Tensor, "layer head_index"], float]:
    """Each head's mean attention from queries ``1…n−1`` to key 0 over ``tokens``, and the loss there."""
    store: list[Tensor] = []

    def keep(pattern: Tensor, hook) -> None:
        store.append(pattern[:, :, 1:, 0].double().mean(dim=(0, 2)))

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)
    return torch.stack(store), float(loss)


def save_checkpoint(path: str | os.PathLike, model, optimizer, state: Mapping[str, Any]) -> Path:
    """Model and optimiser state plus ``state`` (config, step, history), atomically."""
    state = {**state, "backend": lab_backend(model)}
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, model, optimizer=None) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file into ``model`` (and ``optimizer``); returns its ``state``."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    saved = payload["state"].get("backend", "hooked")  # checkpoints before the bridge path were hooked
    if saved != lab_backend(model):
        raise ValueError(
            f"{path} holds a {saved} model but this TransformerLens builds a {lab_backend(model)} one: "
            "retrain it in a new folder or use the TransformerLens it was trained with"
        )
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    model.eval()
    return payload["state"]
