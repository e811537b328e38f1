"""Train one tiny model on the synthetic language, resumably, and measure its sinks and over-mixing.

:func:`train_run` writes into its folder: ``checkpoint.pt`` (every ``eval_every`` steps, atomic;
a restarted run continues from it: batches are a function of ``(seed, step)``, so the resumed run
sees the same data) and ``run.json`` (the :class:`~lens_squash.lab.results.LabRun` at the end; a
finished folder is read back, not retrained).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.records import provenance
from ..edge.lab_models import (
    build_lab_model,
    first_token_attention,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train_step,
)
from ..experiments.mixing import mixing
from .language import BOS, PACKINGS, SyntheticLanguage, step_generator
from .results import LabRun

__all__ = ["LabConfig", "load_trained", "measure_mixing", "train_run"]

#: the seed offset of the held-out rows (never a training step's generator)
_EVAL_STEP = 10**9


@dataclass(frozen=True)
class LabConfig:
    """One run: model shape, data packing, optimisation and measurement settings."""

    n_ctx: int = 64
    n_layers: int = 2
    packing: str = "bos"
    seed: int = 0
    d_model: int = 64
    n_heads: int = 4
    d_vocab: int = 64
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-2
    warmup: int = 30
    eval_every: int = 50
    eval_rows: int = 16
    mixing_prompts: int = 3
    language_seed: int = 0

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if not 1 <= self.n_layers <= 12 or self.d_model % self.n_heads or self.n_ctx < 8:
            raise ValueError("need 1 ≤ n_layers ≤ 12, d_model divisible by n_heads and n_ctx ≥ 8")
        if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1:
            raise ValueError("steps, eval_every and batch_size must be ≥ 1")

    def language(self) -> SyntheticLanguage:
        return SyntheticLanguage(d_vocab=self.d_vocab, seed=self.language_seed)

    def name(self) -> str:
        return f"ctx{self.n_ctx}-L{self.n_layers}-{self.packing}-s{self.seed}"


def _lr(config: LabConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    done = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done))))


def _new(config: LabConfig):
    model = build_lab_model(
        n_layers=config.n_layers,
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_ctx=config.n_ctx,
        d_vocab=config.d_vocab,
        seed=config.seed,
    )
    return model, make_optimizer(model, config.lr)


def _held_out(config: LabConfig) -> torch.Tensor:
    return config.language().batch(
        config.eval_rows, config.n_ctx, config.packing, step_generator(config.seed, _EVAL_STEP)
    )


def load_trained(folder: str | Path):
    """The model a :func:`train_run` folder's checkpoint holds, and its :class:`LabConfig`."""
    path = Path(folder) / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"{folder} holds no checkpoint.pt; train it with train_run first")
    state = torch.load(path, map_location="cpu", weights_only=False)["state"]
    config = LabConfig(**state["config"])
    model, _ = _new(config)
    load_checkpoint(path, model)
    return model, config


def measure_mixing(model, config: LabConfig, *, n_samples: int = 4):
    """Over-mixing on ``mixing_prompts`` held-out rows: the mean ratio per removal and the first result.

    The replaced token sits at a quarter of the context; ``no_bos`` applies only to the ``bos``
    packing (a packed row has no ``<bos>`` to drop); the massive-activation clamp is not run (toy
    models rarely grow one; :func:`~lens_squash.experiments.mixing.mixing` would skip it).
    """
    rows = _held_out(config)[: config.mixing_prompts]
    position = max(1, config.n_ctx // 4)
    removals = ("no_bos", "mask") if config.packing == "bos" else ("mask",)
    results = [
        mixing(
            model,
            row,
            position,
            n_samples=n_samples,
            seed=config.seed + i,
            removals=removals,
            jacobian=False,
            bos=BOS if config.packing == "bos" else None,
        )
        for i, row in enumerate(rows)
    ]
    ratios = {name: sum(r.mean_ratio(name) for r in results) / len(results) for name in removals}
    return ratios, results[0]


def train_run(config: LabConfig, folder: str | Path, *, log: Callable[[str], None] | None = None) -> LabRun:
    """Train ``config`` in ``folder`` (resuming a checkpoint there), measure it, write ``run.json``."""
    folder = Path(folder)
    done = folder / "run.json"
    if done.exists():
        return LabRun.load(done)
    model, optimizer = _new(config)
    path = folder / "checkpoint.pt"
    state = {"config": dataclasses.asdict(config), "step": 0, "history": [], "wall_s": 0.0}
    if path.exists():
        state = load_checkpoint(path, model, optimizer)
        if state["config"] != dataclasses.asdict(config):
            raise ValueError(f"{path} was trained with another config; use another folder or delete it")
    held_out, language = _held_out(config), config.language()
    started, recent = time.perf_counter() - state["wall_s"], []
    if state["step"] == 0 and not state["history"]:
        _evaluate(model, held_out, state, float("nan"))
    for step in range(state["step"], config.steps):
        batch = language.batch(config.batch_size, config.n_ctx, config.packing, step_generator(config.seed, step))
        recent.append(train_step(model, optimizer, batch, _lr(config, step)))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            state["step"] = step + 1
            _evaluate(model, held_out, state, sum(recent) / len(recent))
            recent = []
            state["wall_s"] = time.perf_counter() - started
            save_checkpoint(path, model, optimizer, state)
            if log is not None:
                last = state["history"][-1]
                log(
                    f"{config.name()} step {step + 1}/{config.steps} loss {last['loss']:.3f} sink share {last['share']:.2f}"
                )
    ratios, first = measure_mixing(model, config)
    run = _record(config, state, ratios, first, time.perf_counter() - started)
    run.save(done)
    return run


def _evaluate(model, held_out: torch.Tensor, state: dict, train_loss: float) -> None:
    heads, loss = first_token_attention(model, held_out)
    state["history"].append(
        {
            "step": state["step"],
            "loss": loss,
            "train_loss": train_loss,
            "heads": heads.tolist(),
            "share": float((heads > 0.3).double().mean()),
        }
    )


def _record(config: LabConfig, state: dict, ratios: dict, first, wall_s: float) -> LabRun:
    history = state["history"]
    column = lambda key: torch.tensor([h[key] for h in history], dtype=torch.float64)  # noqa: E731
    return LabRun(
        config=dataclasses.asdict(config),
        steps=column("step"),
        loss=column("loss"),
        train_loss=column("train_loss"),
        head_attention=torch.tensor([h["heads"] for h in history], dtype=torch.float64),
        spread_ratio=ratios,
        mixing=first,
        wall_s=wall_s,
        provenance=provenance(analysis="lab", name=config.name()),
    )
