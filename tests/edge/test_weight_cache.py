"""lens_squash.edge.weight_cache: the Gram matrices from memory and from disk equal a fresh build;
a tampered, truncated or foreign file is never trusted; an edit of any weight reaches a new file."""

from __future__ import annotations

import struct

import pytest
import torch

from lens_squash.algebra.symmetric_forms import LowerBlocks
from lens_squash.edge import lipschitz, weight_cache
from lens_squash.edge.lipschitz import _gram_blocks_from, _mlp_matrices, cached_gram_blocks, supports_certified

from ..families import build


@pytest.fixture()
def disk(tmp_path, monkeypatch):
    """A private cache folder, every factor written to it (however small), the memory side empty."""
    monkeypatch.setenv("LENS_SQUASH_CACHE", str(tmp_path))
    monkeypatch.setenv(weight_cache.DISK_ENV, "1")
    monkeypatch.setattr(weight_cache, "DISK_MIN_BYTES", 0)
    lipschitz._GRAMS.clear()
    yield tmp_path / "factors"
    lipschitz._GRAMS.clear()


def _fresh(block, shape) -> LowerBlocks:
    return _gram_blocks_from(block, shape, *_mlp_matrices(block))


def _equal(a: LowerBlocks, b: LowerBlocks) -> bool:
    return a.starts == b.starts and all(torch.equal(x, y) for x, y in zip(a.columns, b.columns, strict=True))


def _files(folder):
    return sorted(folder.glob("gram-*.bin"))


def test_a_fresh_process_reads_the_grams_from_disk_bit_equal(disk):
    model = build("llama_gqa")
    shape = supports_certified(model)
    built = [cached_gram_blocks(block, shape) for block in model.blocks]
    assert len(_files(disk)) == model.cfg.n_layers
    lipschitz._GRAMS.clear()  # as a new process: nothing in memory
    calls = []
    original = weight_cache.write_factor
    weight_cache.write_factor = lambda *a: calls.append(a)  # a read must not rebuild and rewrite
    try:
        again = [cached_gram_blocks(block, shape) for block in model.blocks]
    finally:
        weight_cache.write_factor = original
    assert not calls
    assert all(_equal(a, b) for a, b in zip(built, again, strict=True))
    assert all(_equal(a, _fresh(block, shape)) for a, block in zip(again, model.blocks, strict=True))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_a_damaged_file_is_ignored_and_rebuilt(disk, damage):
    model = build("gpt2")
    shape = supports_certified(model)
    block = model.blocks[0]
    cached_gram_blocks(block, shape)
    (path,) = _files(disk)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        (length,) = struct.unpack("<Q", raw[8:16])
        raw[-(-(16 + length) // 64) * 64] ^= 0x01  # the lowest mantissa bit of the first entry
    elif damage == "truncate":
        raw = raw[:-64]
    elif damage == "empty":
        raw = bytearray()
    else:
        raw[20:30] = b"x" * 10
    path.write_bytes(bytes(raw))
    digest = path.stem.removeprefix("gram-")
    assert weight_cache.read_factor(path, digest) is None
    lipschitz._GRAMS.clear()
    again = cached_gram_blocks(block, shape)
    assert _equal(again, _fresh(block, shape))
    lipschitz._GRAMS.clear()
    assert weight_cache.read_factor(path, digest) is not None  # rewritten whole


def test_read_factor_refuses_a_file_written_for_other_weights(disk):
    value = LowerBlocks(3, (0, 3), (torch.arange(9.0, dtype=torch.float64).reshape(3, 3),))
    path = disk / "gram-a.bin"
    weight_cache.write_factor(path, value, "a")
    assert _equal(weight_cache.read_factor(path, "a"), value)
    assert weight_cache.read_factor(path, "b") is None


@pytest.mark.parametrize("edit", ["W_in", "W_out", "ln2.w"])
def test_an_edited_weight_gets_its_own_file_and_its_own_gram(disk, edit):
    model = build("gpt2")
    shape = supports_certified(model)
    block = model.blocks[1]
    before = cached_gram_blocks(block, shape)
    lipschitz._GRAMS.clear()
    module, _, name = edit.rpartition(".")
    owner = block.get_submodule(module) if module else block.mlp
    with torch.no_grad():
        getattr(owner, name).mul_(1.5)
    after = cached_gram_blocks(block, shape)
    assert not _equal(before, after) and _equal(after, _fresh(block, shape))
    assert len(_files(disk)) == 2


def test_the_memory_budget_follows_free_memory_and_keeps_every_layer(monkeypatch, disk):
    monkeypatch.setattr(lipschitz, "GRAM_CACHE_BYTES", None)
    monkeypatch.setenv(weight_cache.DISK_ENV, "0")
    monkeypatch.setattr(weight_cache, "available_memory", lambda device="cpu": 10 * 2**30)
    assert lipschitz.gram_cache_budget() == int(weight_cache.MEMORY_SHARE * 10 * 2**30)
    model = build("llama_gqa")
    shape = supports_certified(model)
    for block in model.blocks:
        cached_gram_blocks(block, shape)
    assert len(lipschitz._GRAMS) == model.cfg.n_layers  # no fixed cut: all fit in a share of 10 GiB
    monkeypatch.setattr(weight_cache, "available_memory", lambda device="cpu": 0)
    held = lipschitz._cached_bytes()
    assert lipschitz.gram_cache_budget() == int(weight_cache.MEMORY_SHARE * held)  # no room to grow


def test_the_disk_cache_can_be_turned_off(disk, monkeypatch):
    monkeypatch.setenv(weight_cache.DISK_ENV, "0")
    model = build("gpt2")
    cached_gram_blocks(model.blocks[0], supports_certified(model))
    assert not disk.exists() or not _files(disk)
