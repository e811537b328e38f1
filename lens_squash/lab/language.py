"""A synthetic language with long-range structure, generated on the fly and seeded.

A document has a hidden *topic*; each topic has its own sparse bigram table, so the next token
depends on the previous one and on the topic, which only the whole document so far reveals (a
long-range dependency every position must mix in). With probability ``p_copy`` a token repeats
the one ``lag`` positions back (``lag`` fixed per document, 8 … 32), an induction-style dependency.
With probability ``p_trigger`` a token is one of ``n_triggers`` trigger tokens, and the token after a
trigger copies the one before it (the bigram-backcopy task of Guo et al. 2024, "Active-dormant
attention heads": a head needed only after a trigger has to do nothing elsewhere, which is what a
sink is for). Documents are joined by :data:`SEP`.

Two packings, the contrast Barbero et al. vary: ``"bos"`` starts every row at a document start
after :data:`BOS` (a fixed first token); ``"packed"`` cuts rows from the document stream at random
offsets, so position 0 is an arbitrary token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["BOS", "PACKINGS", "SEP", "SyntheticLanguage", "step_generator"]

BOS, SEP = 0, 1
#: how rows are cut from the document stream
PACKINGS: tuple[str, ...] = ("bos", "packed")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of batch ``step`` of run ``seed``: a resumed run draws the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass(frozen=True)
class SyntheticLanguage:
    """The language: ``d_vocab`` tokens (0 = BOS, 1 = SEP, the rest content), ``n_topics`` bigram
    tables with ``fan_out`` likely successors per token, drawn from ``seed``."""

    d_vocab: int = 64
    n_topics: int = 8
    fan_out: int = 3
    p_copy: float = 0.1
    n_triggers: int = 3
    p_trigger: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.d_vocab < 8 or self.n_topics < 1 or not 1 <= self.fan_out < self.d_vocab - 2:
            raise ValueError("need d_vocab ≥ 8, n_topics ≥ 1 and 1 ≤ fan_out < d_vocab − 2")
        if not (0.0 <= self.p_copy < 1.0 and 0.0 <= self.p_trigger < 1.0 and self.p_copy + self.p_trigger < 1.0):
            raise ValueError(
                f"p_copy and p_trigger are probabilities summing below 1, got {self.p_copy}, {self.p_trigger}"
            )
        if not 0 <= self.n_triggers < self.d_vocab - 2:
            raise ValueError(f"n_triggers must leave content tokens, got {self.n_triggers}")

    @property
    def n_content(self) -> int:
        return self.d_vocab - 2

    def tables(self) -> Tensor:
        """``[topic, previous, next]`` transition probabilities over content tokens (rows sum to 1)."""
        generator = torch.Generator().manual_seed(self.seed)
        c = self.n_content
        logits = torch.full((self.n_topics, c, c), -4.0)  # a little mass everywhere: no dead ends
        likely = torch.rand(self.n_topics, c, c, generator=generator).argsort(-1)[..., : self.fan_out]
        boost = 3.0 + 2.0 * torch.rand(self.n_topics, c, self.fan_out, generator=generator)
        logits.scatter_(-1, likely, boost)
        return logits.softmax(-1)

    def stream(self, batch: int, length: int, generator: torch.Generator, *, min_doc: int, max_doc: int) -> Tensor:
        """``[batch, length]`` rows of documents joined by SEP, each row starting a document."""
        tables = self.tables()
        rows = torch.empty(batch, length, dtype=torch.long)
        topic = torch.randint(self.n_topics, (batch,), generator=generator)
        left = torch.randint(min_doc, max_doc + 1, (batch,), generator=generator)
        lag = torch.randint(8, 33, (batch,), generator=generator)
        start = torch.zeros(batch, dtype=torch.long)  # where the current document began
        prev = torch.randint(self.n_content, (batch,), generator=generator)
        arange = torch.arange(batch)
        for i in range(length):
            sampled = torch.multinomial(tables[topic, prev], 1, generator=generator).squeeze(-1)
            draw = torch.rand(batch, generator=generator)
            back = i - lag
            copied = rows[arange, back.clamp_min(0)] - 2
            token = torch.where((back >= start) & (draw < self.p_copy) & (copied >= 0), copied, sampled)
            trigger = torch.randint(max(1, self.n_triggers), (batch,), generator=generator)
            token = torch.where((draw >= 1 - self.p_trigger) & (self.n_triggers > 0), trigger, token)
            # after a trigger: the token before the trigger, whatever else was drawn
            before = rows[arange, max(i - 2, 0)] - 2
            backcopy = (i - 2 >= start) & (prev < self.n_triggers) & (rows[arange, max(i - 1, 0)] >= 2) & (before >= 0)
            token = torch.where(backcopy, before, token)
            ended = left == 0
            rows[:, i] = torch.where(ended, torch.full_like(token, SEP), token + 2)
            prev = torch.where(ended, prev, token)
            left = left - 1
            # a SEP ends the document: draw the next one's topic, length and lag
            new_topic = torch.randint(self.n_topics, (batch,), generator=generator)
            new_left = torch.randint(min_doc, max_doc + 1, (batch,), generator=generator)
            new_lag = torch.randint(8, 33, (batch,), generator=generator)
            topic = torch.where(ended, new_topic, topic)
            left = torch.where(ended, new_left, left)
            lag = torch.where(ended, new_lag, lag)
            start = torch.where(ended, torch.full_like(start, i + 1), start)
        return rows

    def batch(self, batch: int, n_ctx: int, packing: str, generator: torch.Generator) -> Int[Tensor, "batch pos"]:
        """``[batch, n_ctx]`` training rows in ``packing`` (:data:`PACKINGS`)."""
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        docs = dict(min_doc=max(4, n_ctx // 2), max_doc=2 * n_ctx)
        if packing == "bos":
            body = self.stream(batch, n_ctx - 1, generator, **docs)
            return torch.cat([torch.full((batch, 1), BOS), body], dim=1)
        # packed: a window at a random offset into the stream, so rows start anywhere in a document
        offset = torch.randint(0, 2 * n_ctx, (batch,), generator=generator)
        stream = self.stream(batch, 3 * n_ctx, generator, **docs)
        index = offset[:, None] + torch.arange(n_ctx)[None, :]
        return stream.gather(1, index)
