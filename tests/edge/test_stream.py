"""The sweep's recompute writes its softmax over scores nobody else holds, and never over scores a
global module hook may have kept."""

from __future__ import annotations

import pytest
import torch

from lens_squash.edge.stream import recompute_patterns, softmax_after_scores
from lens_squash.edge.trace import trace

from ..families import TOKENS, build


@pytest.mark.hooked
def test_a_global_hook_keeps_the_scores_it_saw_and_the_patterns_stay_the_traced_ones():
    model = build("llama_gqa")
    whole = trace(model, TOKENS, keep_patterns=True)
    streamed = trace(model, TOKENS, keep_patterns=False)
    assert softmax_after_scores(model, 1)  # the recompute takes the softmax itself
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module, args, output):
        if getattr(module, "name", "") == "blocks.1.attn.hook_attn_scores":
            kept.append((output, output.clone()))  # the tensor itself, and its value then

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        patterns = recompute_patterns(model, streamed, 1)
    finally:
        handle.remove()
    assert len(kept) == 1
    held, value = kept[0]
    assert torch.equal(held, value)  # not overwritten by the patterns
    assert torch.equal(patterns, whole.patterns[1])
    assert torch.equal(recompute_patterns(model, streamed, 1), whole.patterns[1])  # in place: the same bits
