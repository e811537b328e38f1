"""Static export: bad requests are refused before any browser starts; with Chromium the files are real
images of the figure (the PNG decoded here by a minimal reader: right size, not blank)."""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from lens_squash.views import export
from lens_squash.views.attention_figures import attention_heatmap
from lens_squash.views.bound_figures import bound_vs_jacobian
from lens_squash.views.export import ExportError, fig_to_file, write_figures


def figure(title: str = "Sensitivity check") -> go.Figure:
    n = 12
    return bound_vs_jacobian(
        [f" t{i}" for i in range(n)], torch.linspace(1, 3, n), {"rollout": torch.rand(n) + 0.5}, title=title
    )


# --- a minimal PNG reader (RFC 2083: chunks, zlib, the five row filters) ------------------------------


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, at = {}, 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        chunks[kind] = chunks.get(kind, b"") + data[at + 8 : at + 8 + length]
        at += 12 + length
    return chunks


def png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png_chunks(data)[b"IHDR"][:8])
    return width, height


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB or RGBA, non-interlaced PNG as a ``[height, width, channels]`` uint8 array."""
    chunks = png_chunks(data)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour in (2, 6) and interlace == 0, "only 8-bit RGB(A), non-interlaced"
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = width * bpp
    rows, previous = [], np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        if kind == 2:  # up
            line = (line + previous) % 256
        elif kind in (1, 3, 4):  # sub, average, paeth: sequential along the row
            out = line.tolist()
            up = previous.tolist()
            for i in range(stride):
                left = out[i - bpp] if i >= bpp else 0
                corner = up[i - bpp] if i >= bpp else 0
                pred = left if kind == 1 else (left + up[i]) // 2 if kind == 3 else _paeth(left, up[i], corner)
                out[i] = (out[i] + pred) % 256
            line = np.asarray(out, dtype=np.int64)
        else:
            assert kind == 0, f"unknown PNG filter {kind}"
        rows.append(line)
        previous = line
    return np.stack(rows).astype(np.uint8).reshape(height, width, bpp)


def test_the_png_reader_reads_a_png_it_did_not_write():
    # a 3×2 RGB image written by hand with the 'sub' and 'up' filters
    pixels = np.array([[[10, 20, 30], [40, 50, 60], [70, 80, 90]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]], dtype=np.uint8)
    row0 = pixels[0].ravel().astype(int)
    sub = np.concatenate([row0[:3], (row0[3:] - row0[:-3]) % 256])
    up = (pixels[1].ravel().astype(int) - row0) % 256
    raw = bytes([1, *sub.tolist(), 2, *up.tolist()])

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    assert png_size(data) == (3, 2)
    np.testing.assert_array_equal(decode_png(data), pixels)


# --- refusals, no browser needed -------------------------------------------------------------------


def test_bad_requests_are_refused_before_rendering(tmp_path):
    fig = figure()
    with pytest.raises(ValueError, match="unknown image format 'bmp'"):
        fig_to_file(fig, tmp_path / "a.bmp")
    with pytest.raises(ValueError, match="add an extension or pass format="):
        fig_to_file(fig, tmp_path / "a")
    with pytest.raises(ValueError, match="width"):
        fig_to_file(fig, tmp_path / "a.png", width=0)
    with pytest.raises(ValueError, match="scale"):
        fig_to_file(fig, tmp_path / "a.png", scale=-1)
    with pytest.raises(TypeError, match="go.Figure"):
        fig_to_file({"data": []}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="both be written"):
        write_figures({"bound vs gradient": fig, "bound/vs/gradient": fig}, tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        write_figures({}, tmp_path)
    with pytest.raises(ValueError, match="formats is empty"):
        write_figures({"a": fig}, tmp_path, formats=())
    assert list(tmp_path.iterdir()) == []


def test_a_missing_browser_or_kaleido_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_SQUASH_CHROMIUM", str(tmp_path / "no-such-chromium"))
    with pytest.raises(ExportError, match="apt-get install -y chromium"):
        fig_to_file(figure(), tmp_path / "a.png")
    monkeypatch.delenv("LENS_SQUASH_CHROMIUM")
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido now raises ImportError
    with pytest.raises(ExportError, match=r'pip install "kaleido>=1"'):
        fig_to_file(figure(), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_the_browser_choice_follows_the_documented_order(tmp_path, monkeypatch):
    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv("LENS_SQUASH_CHROMIUM", raising=False)
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    assert export.chromium_path() == str(fake)
    monkeypatch.setenv("LENS_SQUASH_CHROMIUM", "/bin/sh")
    assert export.chromium_path() == "/bin/sh"  # lens_squash's own variable wins over kaleido's


# --- real exports through kaleido and Chromium -----------------------------------------------------


@pytest.mark.browser
def test_a_png_has_the_requested_size_and_is_not_blank(tmp_path):
    fig = figure()
    path = fig_to_file(fig, tmp_path / "bound.png", width=640, height=480, scale=1)
    data = path.read_bytes()
    assert png_size(data) == (640, 480)
    pixels = decode_png(data)[..., :3].astype(float)
    assert pixels.shape == (480, 640, 3)
    assert pixels.var() > 100  # a blank or single-colour image has (near) zero variance
    dark = (pixels.sum(-1) < 200).mean()  # text, axes and the black Jacobian curve
    assert 0.002 < dark < 0.5
    doubled = fig_to_file(fig, tmp_path / "bound@2x.png", width=640, height=480)  # 2× by default
    assert png_size(doubled.read_bytes()) == (1280, 960)


@pytest.mark.browser
def test_write_figures_writes_every_format_of_every_figure(tmp_path):
    figs = {
        "bound vs gradient": figure("Bound against gradient"),
        "heat": attention_heatmap(
            torch.softmax(
                torch.randn(1, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -torch.inf), -1
            )
        ),
    }
    written = write_figures(figs, tmp_path / "figures", formats=("png", "svg", "pdf"), width=500, height=400)
    assert [p.name for p in written["bound vs gradient"]] == [
        "bound_vs_gradient.png",
        "bound_vs_gradient.svg",
        "bound_vs_gradient.pdf",
    ]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(
        p.name for paths in written.values() for p in paths
    )  # no staging folder left behind
    png, svg, pdf = (p.read_bytes() for p in written["bound vs gradient"])
    assert png_size(png) == (1000, 800)  # layout pixels × the default 2× scale
    assert svg.lstrip().startswith(b"<svg") and b"Bound against gradient" in svg and b'width="500"' in svg
    assert pdf.startswith(b"%PDF")
    heat = decode_png(written["heat"][0].read_bytes())[..., :3].astype(float)
    assert heat.var() > 100
