"""TransformerLens's attention without its redundant passes over ``[head, query_pos, key_pos]``.

TransformerLens 3.9's ``AbstractAttention.forward`` builds five fresh ``H·n²`` tensors between the
scores and ``pattern @ v``: the scores divided by the scale, the causally masked copy (``torch.where``),
the softmax, and the NaN clean-up (``isnan`` + ``zeros_like`` + ``where``) that changes nothing unless a
row is NaN. On a CPU each fresh tensor also pays its page faults, so at n = 2048 these passes cost
about as much as the attention's two matmuls (``benchmarks/fast_attention.py``).

:func:`fast_attention` swaps, for the duration of a ``with`` block, the forward of every attention
module whose result it can reproduce **bit for bit** for one that does the same arithmetic in place
on one fresh tensor: ``q @ k`` then ``div_`` by the scale (the same kernel as ``/``), the mask written
with ``torch.where(..., out=scores)`` (the same values ``torch.where`` picks), the softmax written over
the scores (the same kernel as ``F.softmax``; only when no hook on ``hook_attn_scores`` could hold the
scores), the NaN clean-up only when the patterns hold a NaN, then TransformerLens's own ``z`` and
output projection. Every hook fires with the same value in the same order. Anything it does not
model keeps TransformerLens's forward: learned sinks, ALiBi and relative biases, OLMo's q/k norms and
clipping, soft caps (their division stays TransformerLens's), padding masks and KV caches, 4-bit
weights, ``use_attn_result``, a subclass's or an instance's own forward, autograd (nothing is done in
place while gradients are recorded), bridges, and a TransformerLens release whose source no longer
reads as this module expects (:func:`_transformer_lens_matches`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Iterator

import torch
from torch import Tensor

from .backends import has_hooked_transformer, is_bridge

__all__ = ["fast_attention", "fast_layers", "global_module_hooks", "softmax_over"]

#: lines of TransformerLens 3.9 whose behaviour the fast forward reproduces; a release that no
#: longer reads so keeps its own forward everywhere
_EXPECTED = {
    "forward": (
        "attn_scores = self.apply_causal_mask(",
        "attn_scores = self.hook_attn_scores(attn_scores)",
        "pattern = F.softmax(attn_scores, dim=-1)",
        "pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)",
        "pattern = self.hook_pattern(pattern)",
        "pattern = pattern.to(device=v.device, dtype=v.dtype)",
        "z = self.calculate_z_scores(v, pattern)",
        "out = F.linear(z, w, b_O)",
    ),
    "calculate_attention_scores": (
        "attn_scores = q_ @ k_ / self.attn_scale",
        "attn_scores = apply_softcap(attn_scores, self.cfg.attn_scores_soft_cap)",
    ),
    "apply_causal_mask": ("return torch.where(final_mask, attn_scores, ignore)",),
}
_GQA_SCORES = "k = torch.repeat_interleave(k, dim=2, repeats=self.repeat_kv_heads)"
_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


@functools.cache
def _transformer_lens_matches() -> bool:
    """Whether TransformerLens's attention source holds every line the fast forward reproduces."""
    if not has_hooked_transformer():
        return False
    try:
        from transformer_lens.components.abstract_attention import AbstractAttention
        from transformer_lens.components.grouped_query_attention import GroupedQueryAttention

        sources = {name: inspect.getsource(getattr(AbstractAttention, name)) for name in _EXPECTED}
        gqa = inspect.getsource(GroupedQueryAttention.calculate_attention_scores)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return _GQA_SCORES in gqa and all(line in sources[name] for name, lines in _EXPECTED.items() for line in lines)


def _eligible(model, attn) -> bool:
    """Whether ``attn``'s forward is TransformerLens's own, on a config the fast forward reproduces."""
    from transformer_lens.components.abstract_attention import AbstractAttention

    if not isinstance(attn, AbstractAttention):
        return False
    cfg = attn.cfg
    kind = type(attn)
    own = all(
        getattr(kind, name) is getattr(AbstractAttention, name)
        for name in ("forward", "apply_causal_mask", "_make_causal_mask")  # what _forward and _masked replace
    )
    return (
        own
        and "forward" not in vars(attn)
        and _scores_method(attn) is not None
        and not getattr(cfg, "use_attention_sinks", False)
        and cfg.original_architecture not in _OLMO
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.positional_embedding_type in ("standard", "rotary", "shortformer")
        and not cfg.use_attn_result
        and not getattr(cfg, "load_in_4bit", False)
    )


def _scores_method(attn) -> str | None:
    """How the scores are formed: ``"plain"`` (``q @ k / scale``), ``"grouped"`` (keys repeated per
    query head first), ``"capped"`` (a soft cap: TransformerLens's own method, out of place), or
    ``None`` for a method this module does not know."""
    from transformer_lens.components.abstract_attention import AbstractAttention
    from transformer_lens.components.grouped_query_attention import GroupedQueryAttention

    method = type(attn).calculate_attention_scores
    if method not in (AbstractAttention.calculate_attention_scores, GroupedQueryAttention.calculate_attention_scores):
        return None
    cap = getattr(attn.cfg, "attn_scores_soft_cap", None)
    if cap is not None and cap > 0:
        return "capped"
    return "grouped" if method is GroupedQueryAttention.calculate_attention_scores else "plain"


def fast_layers(model) -> list[int]:
    """The layers whose attention :func:`fast_attention` replaces on ``model``."""
    if is_bridge(model) or not _transformer_lens_matches():
        return []
    return [i for i, block in enumerate(getattr(model, "blocks", ())) if _eligible(model, getattr(block, "attn", None))]


@contextlib.contextmanager
def fast_attention(model) -> Iterator[list[int]]:
    """Within the block, the eligible layers' attention runs :func:`_forward` (bit-identical to
    TransformerLens's); yields those layers. Restored on exit, also after an exception."""
    layers = fast_layers(model)
    swapped = []
    try:
        for layer in layers:
            attn = model.blocks[layer].attn
            attn.forward = types.MethodType(_forward, attn)
            swapped.append(attn)
        yield layers
    finally:
        for attn in swapped:
            del attn.forward  # the class's forward shows through again


def _forward(
    self,
    query_input: Tensor,
    key_input: Tensor,
    value_input: Tensor,
    past_kv_cache_entry=None,
    additive_attention_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_bias: Tensor | None = None,
) -> Tensor:
    """``AbstractAttention.forward`` for the calls it reproduces (no cache, mask, bias or autograd),
    with its ``H·n²`` passes done in place; any other call goes to TransformerLens's forward."""
    from transformer_lens.components.abstract_attention import AbstractAttention

    extras = (past_kv_cache_entry, additive_attention_mask, attention_mask, position_bias)
    if torch.is_grad_enabled() or any(extra is not None for extra in extras):
        return AbstractAttention.forward(self, query_input, key_input, value_input, *extras)
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, 0, None))
        k = self.hook_rot_k(self.apply_rotary(k, 0, None))
    if self.cfg.use_logn_attn and not self.training:
        q = self._apply_logn_scaling(q, 0)
    scores = _masked(self, _scores(self, q, k))
    scores = self.hook_attn_scores(scores)
    pattern = self.hook_pattern(_softmax(self, scores))
    pattern = pattern.to(device=v.device, dtype=v.dtype)
    return _output(self, self.calculate_z_scores(v, pattern))


def _scores(self, q: Tensor, k: Tensor) -> Tensor:
    """``calculate_attention_scores`` as a fresh tensor that nothing else references: the division
    by the scale in place (``div_`` runs the kernel ``/`` runs, so the values are the same)."""
    method = _scores_method(self)
    if method == "capped":
        return self.calculate_attention_scores(q, k)  # its own fresh result; the cap needs two passes anyway
    if method == "grouped" and not self.cfg.ungroup_grouped_query_attention:
        k = torch.repeat_interleave(k, dim=2, repeats=self.repeat_kv_heads)
    # the same views TransformerLens's einops.rearrange returns, so the same batched matmul
    return (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)).div_(self.attn_scale)


def _masked(self, scores: Tensor) -> Tensor:
    """``apply_causal_mask`` written into ``scores`` (``torch.where`` with ``out``: the same entries
    picked, no new ``H·n²`` tensor); a bidirectional layer is left as it is."""
    if (self._attention_dir_override or self.cfg.attention_dir) != "causal":
        return scores
    n_query, n_key = scores.shape[-2:]
    if n_query != n_key:  # TransformerLens raises here; let it
        return self.apply_causal_mask(scores, 0, None)
    mask = self._make_causal_mask(query_ctx_length=n_query, key_ctx_length=n_key, past_kv_pos_offset=0,
                                  device=scores.device)  # fmt: skip
    ignore = self.IGNORE.to(scores.device)
    if torch.result_type(scores, ignore) != scores.dtype:
        return torch.where(mask, scores, ignore)
    return torch.where(mask, scores, ignore, out=scores)


def _softmax(self, scores: Tensor) -> Tensor:
    """``F.softmax(scores, -1)`` with NaNs set to 0, as TransformerLens takes it. Written over the
    scores when no hook on ``hook_attn_scores`` (nor a global module hook) could have kept them; the
    clean-up runs only when a NaN is there (entries are in [0, 1], so the sum is NaN iff one is)."""
    point = self.hook_attn_scores
    hooked = point._forward_hooks or point._forward_pre_hooks  # a pre-hook sees (and may keep) the scores too
    hooked = hooked or global_module_hooks()
    pattern = torch.nn.functional.softmax(scores, dim=-1) if hooked else softmax_over(scores)
    if torch.isnan(pattern.sum()):
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    return pattern


def global_module_hooks() -> bool:
    """Whether a global module hook is set (it may have kept any module's input or output)."""
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def softmax_over(scores: Tensor) -> Tensor:
    """``F.softmax(scores, dim=-1)`` written over ``scores`` (the same kernel, so the same values, without
    a fresh tensor: at n = 2048 a fresh ``H·n²`` tensor's page faults cost about as much as the
    softmax); out of place when ``scores`` is not contiguous. The caller must own ``scores``."""
    if not scores.is_contiguous():
        return torch.nn.functional.softmax(scores, dim=-1)
    return torch.ops.aten._softmax.out(scores, -1, half_to_float=False, out=scores)


def _output(self, z: Tensor) -> Tensor:
    """TransformerLens's output projection for ``use_attn_result=False`` without 4-bit weights."""
    w = self.W_O.permute(2, 0, 1).reshape(self.W_O.shape[2], -1).contiguous()  # d_model (head_index d_head)
    w = w.to(z.device)
    b_o = self.b_O.to(z.device)
    z = z.to(w.dtype).reshape(z.shape[0], z.shape[1], self.cfg.d_head * self.cfg.n_heads)
    if z.device.type == "mps":  # TransformerLens's workaround for F.linear on MPS
        return torch.matmul(z, w.T) + b_o
    return torch.nn.functional.linear(z, w, b_o)
