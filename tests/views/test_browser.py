"""Reports in a real headless Chromium: every figure renders, no console error, no injected script runs.

Chromium is driven through the Chrome DevTools Protocol over its debugging websocket, with a minimal
standard-library websocket client (no new dependencies). The tests never skip: without a Chromium
binary they fail and say how to install one (``make test`` installs it: ``apt-get install -y
chromium``); set ``LENS_SQUASH_CHROMIUM`` to point at another Chrome/Chromium binary.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lens_squash.views.attention_figures import attention_heatmap
from lens_squash.views.bound_figures import bound_vs_jacobian
from lens_squash.views.collapse_figures import collapse_figure, head_band_figure
from lens_squash.views.edge_figures import attention_paths
from lens_squash.views.report import (
    ReportSection,
    build_report,
    model_section,
    prompt_section,
    write_report,
)
from lens_squash.views.sink_figures import sink_figure
from lens_squash.views.spectral_figures import spectral_figure

pytestmark = pytest.mark.browser

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")


def _chromium() -> str | None:
    override = os.environ.get("LENS_SQUASH_CHROMIUM")
    if override:
        return override if shutil.which(override) or Path(override).is_file() else None
    return next((path for path in map(shutil.which, _CANDIDATES) if path), None)


# --------------------------------------------------------------------------------------------------
# a minimal websocket client (RFC 6455, client side: masked frames out, unmasked frames in)
# --------------------------------------------------------------------------------------------------


class _WebSocket:
    def __init__(self, url: str, timeout: float = 20.0):
        host_port, path = url.removeprefix("ws://").split("/", 1)
        host, port = host_port.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the debugging endpoint closed during the websocket handshake")
            response += chunk
        head, self.buffer = response.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket upgrade refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the browser closed the websocket")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("the browser closed the websocket")
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:  # FIN: the message is complete
                    return message.decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


# --------------------------------------------------------------------------------------------------
# the DevTools session
# --------------------------------------------------------------------------------------------------


class _Page:
    """One browser tab attached with a flat session; events are kept in ``self.events``."""

    def __init__(self, browser: _Browser):
        self.browser = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.events: list[dict] = []
        browser.pages[self.session] = self
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.call(method, params, session=self)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"evaluating {expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path, timeout: float = 20.0) -> None:
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        self.browser.wait(lambda: any(e["method"] == "Page.loadEventFired" for e in self.events), timeout, self)

    def wait_until(self, expression: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r}")
            time.sleep(0.05)

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(
                    f"console.{params['type']}: {[a.get('value', a.get('description')) for a in params['args']]}"
                )
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} ({params['entry'].get('url')})")
        return found

    def dialogs(self) -> list[dict]:
        return [e["params"] for e in self.events if e["method"] == "Page.javascriptDialogOpening"]


class _Browser:
    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="lens-squash-chromium-")
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--window-size=1280,1600",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.next_id = 0
        self.pages: dict[str, _Page] = {}
        try:
            self.ws = _WebSocket(self._endpoint())
        except BaseException:
            self._stop()
            raise

    def _endpoint(self, timeout: float = 20.0) -> str:
        # with port 0, Chromium writes the port it picked and the browser target's path to this file
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode} before listening")
            lines = port_file.read_text().split() if port_file.exists() else []
            if len(lines) == 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its debugging port in time")

    def _send(self, method: str, params: dict | None, session: _Page | None) -> int:
        self.next_id += 1
        request = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            request["sessionId"] = session.session
        self.ws.send(json.dumps(request))
        return self.next_id

    def _dispatch(self, message: dict) -> dict | None:
        if "id" in message:
            return message
        page = self.pages.get(message.get("sessionId"))
        if page is not None:
            page.events.append(message)
            if message["method"] == "Page.javascriptDialogOpening":
                # a dialog blocks the page (and its load event): record it, dismiss it, carry on
                self._send("Page.handleJavaScriptDialog", {"accept": False}, page)
        return None

    def call(self, method: str, params: dict | None = None, session: _Page | None = None) -> dict:
        request_id = self._send(method, params, session)
        while True:
            reply = self._dispatch(json.loads(self.ws.recv()))
            if reply is not None and reply["id"] == request_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})

    def wait(self, condition, timeout: float, page: _Page) -> None:
        deadline = time.monotonic() + timeout
        self.ws.sock.settimeout(timeout)
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for a browser event")
            self._dispatch(json.loads(self.ws.recv()))

    def new_page(self) -> _Page:
        return _Page(self)

    def _stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self._stop()


@pytest.fixture(scope="module")
def browser():
    binary = _chromium()
    if binary is None:
        pytest.fail(
            "no Chromium binary found on PATH; install Debian's package (`apt-get install -y chromium`, "
            "which `make test` runs when it is missing) or set LENS_SQUASH_CHROMIUM to a Chrome/Chromium binary",
            pytrace=False,
        )
    instance = _Browser(binary)
    yield instance
    instance.close()


def _rendered(n_figures: int) -> str:
    return (
        "(() => { const divs = [...document.querySelectorAll('.js-plotly-plot')]; "
        f"return divs.length === {n_figures} && divs.every(d => d._fullLayout && d.querySelector('.main-svg')); }})()"
    )


# --------------------------------------------------------------------------------------------------
# the reports under test
# --------------------------------------------------------------------------------------------------


def _tiny_results():
    """Patterns and tokens of a tiny random model, with rollout flows computed here in plain torch
    (this test is about rendering, so it does not depend on the bound modules)."""
    from lens_squash.edge.models import tiny_model
    from lens_squash.edge.trace import trace

    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, seed=1)
    traced = trace(model, torch.arange(1, 11))
    patterns = traced.patterns.double()
    n_layers, n_heads, n = patterns.shape[0], patterns.shape[1], traced.n_tokens
    eye = torch.eye(n, dtype=torch.float64)
    layers = [0.5 * (patterns[l].mean(0) + eye) for l in range(n_layers)]  # Prop. B.8's Λ̃ per layer
    forward = [torch.eye(n, dtype=torch.float64)]  # g: product of the layers below, Ā^(l-1)…Ā^(0)
    for matrix in layers:
        forward.append(matrix @ forward[-1])
    profile = forward[-1][n - 1]  # the last token's row of the whole product
    backward = torch.zeros(n, dtype=torch.float64)
    backward[n - 1] = 1.0
    head_flows, residual_flows = torch.zeros_like(patterns), torch.zeros(n_layers, n, dtype=torch.float64)
    for l in reversed(range(n_layers)):  # f: e_nᵀ Ā^(L-1)…Ā^(l+1); flow = f_j · w_h A_jk · g_k (source 0)
        into = forward[l][:, 0]
        head_flows[l] = backward[None, :, None] * (0.5 / n_heads) * patterns[l] * into[None, None, :]
        residual_flows[l] = backward * 0.5 * into
        backward = backward @ layers[l]
    return traced, (head_flows, residual_flows), profile


def _report_sections(traced, flows, profile, str_tokens, prompt):
    n = traced.n_tokens
    lengths = [2, 4, 8, 16]
    return [
        model_section(traced.provenance),
        prompt_section(prompt, str_tokens, predicted=traced.predicted_token),
        ReportSection(
            "bound vs gradient",
            figures=[
                bound_vs_jacobian(
                    str_tokens, torch.linspace(1, 2, n), {"rollout": profile, "<b>hostile</b>": profile.flip(0) + 1e-3}
                )
            ],
        ),
        ReportSection(
            "paths",
            figures=[
                attention_paths({n - 1: flows}, str_tokens, top_k=12),
                attention_heatmap(traced.patterns, str_tokens),
            ],
        ),
        ReportSection(
            "spectral",
            figures=[
                spectral_figure(
                    spectrum=torch.rand(2, n),
                    second_eigenvalue=torch.rand(2),
                    dobrushin=torch.rand(2),
                    rollout_mass=torch.rand(2),
                    rank_one_distance=torch.rand(2),
                )
            ],
        ),
        ReportSection(
            "sinks",
            figures=[
                sink_figure(
                    {"first token mass": traced.mean_first_token_attention(), "norm ratio": torch.rand(3) * 100},
                    (1, 2),
                    log=("norm ratio",),
                )
            ],
        ),
        ReportSection(
            "collapse",
            figures=[
                collapse_figure(
                    lengths,
                    {"float32": [1e-3, 1e-5, 0.0, 0.0], "bfloat16": [1e-2, 0, 0, 0]},
                    {"float32": 6e-8, "bfloat16": 4e-3},
                ),
                head_band_figure(lengths, [1, 0.5, 0.2, 0.1], [0.5, 0.2, 0.1, 0.01], [2, 1, 0.5, 0.3]),
            ],
        ),
    ]


def _load(browser, path: Path, n_figures: int) -> _Page:
    page = browser.new_page()
    page.open(path)
    page.wait_until(_rendered(n_figures))
    return page


def _apply_every_menu_button(page: _Page) -> int:
    """Apply each dropdown button's and slider step's own args with Plotly.update, as a click would
    (every control the figures use is an 'update'); count them."""
    return page.evaluate(
        "(async () => { let n = 0; for (const d of document.querySelectorAll('.js-plotly-plot')) {"
        " for (const menu of (d.layout.updatemenus || [])) { for (const b of menu.buttons) {"
        " await Plotly.update(d, ...b.args); n += 1; } }"
        " for (const s of (d.layout.sliders || [])) { for (const st of s.steps) {"
        " await Plotly.update(d, ...st.args); n += 1; } } } return n; })()"
    )


@pytest.mark.hooked
def test_report_renders_every_figure_without_console_errors(browser, tmp_path):
    traced, flows, profile = _tiny_results()
    sections = _report_sections(traced, flows, profile, traced.str_tokens, "token ids 1..10 ($x$ & <ok>)")
    html_path, _ = write_report(tmp_path, sections, {"bound": profile}, metadata=traced.provenance)
    n_figures = sum(len(s.figures) for s in sections)
    assert html_path.read_text().count('class="plotly-graph-div"') == n_figures

    page = _load(browser, html_path, n_figures)
    assert page.evaluate("typeof Plotly.newPlot") == "function"
    assert page.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg').length") >= n_figures
    assert _apply_every_menu_button(page) > 0
    assert page.errors() == []
    shot = page.call("Page.captureScreenshot", {"format": "png"})
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


HOSTILE = (
    "<script>window.__pwned = 1</script>",
    '</script><img src=x onerror="window.__pwned = 2; alert(2)">',
    "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(3)>',
    "<script>document.title = 'pwned'</script>",
)


@pytest.mark.hooked
def test_hostile_prompt_and_tokens_do_not_execute(browser, tmp_path):
    traced, flows, profile = _tiny_results()
    tokens = [HOSTILE[i % len(HOSTILE)] if i % 2 else t for i, t in enumerate(traced.str_tokens)]
    prompt = " ".join(HOSTILE)
    sections = _report_sections(traced, flows, profile, tokens, prompt)
    sections.append(ReportSection(HOSTILE[0], text=HOSTILE[1], table={HOSTILE[2]: HOSTILE[3]}))
    path = tmp_path / "hostile.html"
    path.write_text(build_report(sections, title="hostile <script>alert(4)</script>", metadata={"prompt": prompt}))
    n_figures = sum(len(s.figures) for s in sections)

    page = _load(browser, path, n_figures)
    _apply_every_menu_button(page)
    time.sleep(0.2)  # give any injected onerror/onload handler time to fire
    assert page.evaluate("window.__pwned === undefined")
    assert page.evaluate("document.title") == "hostile <script>alert(4)</script>"
    assert page.dialogs() == []
    # nothing but plotly's own elements: 2 scripts in <head> and one per figure, no <img>, no onload
    assert page.evaluate("document.scripts.length") == 2 + n_figures
    assert page.evaluate("document.querySelectorAll('img, [onload], [onerror]').length") == 0
    # the payloads are displayed as text: in the prompt, the token chips and the figures' tick labels
    body_text = page.evaluate("document.body.innerText")
    assert HOSTILE[1] in body_text and HOSTILE[2] in body_text
    ticks = page.evaluate("[...document.querySelectorAll('.xtick text')].map(t => t.textContent).join(' ')")
    assert "<img␣src=x␣onerror=alert(1)>" in ticks
    assert page.errors() == []


def test_an_analysis_report_renders_its_typed_arrays_and_coloured_tokens(browser, tmp_path):
    """The compact report as plotly.js reads it: every heatmap's decoded z is the figure's attention to the
    four digits shown, and the prompt's chips carry the Jacobian's colours."""
    import numpy as np

    from lens_squash.core.tokens import sensitivity_colour
    from lens_squash.edge.models import load_model
    from lens_squash.experiments.analysis import analyze
    from lens_squash.views.report import analysis_sections

    model = load_model("tiny-random", n_ctx=256)
    analysis = analyze(model, "Copy: 1 1 1 1 1 1 0", jacobian_mode="sketch", n_probes=4)
    sections = analysis_sections(analysis)
    figures = [fig for s in sections for fig in s.figures]
    html_path, _ = write_report(tmp_path, sections, {}, metadata=analysis.trace.provenance)
    page = _load(browser, html_path, len(figures))
    assert page.errors() == []
    attention = next(i for i, fig in enumerate(figures) if fig.layout.coloraxis.colorscale)
    # plotly.js decodes a visible trace's typed array into _fullData (hidden ones wait for the slider)
    decoded = page.evaluate(
        f"(() => {{ const d = document.querySelectorAll('.js-plotly-plot')[{attention}];"
        " return d._fullData.filter(t => t.type === 'heatmap' && t.z)"
        ".map(t => [t.index, Array.from(t.z, r => Array.from(r, v => Number.isNaN(v) ? null : v))]); })()"
    )
    assert decoded  # the first step's maps were drawn
    for index, got in decoded:
        want = np.asarray(figures[attention].data[index].z, dtype=np.float64)
        got = np.array([[np.nan if v is None else v for v in row] for row in got], dtype=np.float64)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=5.01e-4, atol=0, equal_nan=True)
    truth = analysis.table[[c for c in analysis.table.columns if str(c).startswith("jacobian_")][0]].to_numpy()
    colours = page.evaluate(
        "[...document.querySelectorAll('.lens-squash-tokens bdi')].map(b => getComputedStyle(b).backgroundColor)"
    )
    assert len(colours) == analysis.trace.n_tokens
    for colour, value in zip(colours, truth, strict=True):
        want = sensitivity_colour(value / truth.max())
        assert colour == "rgb({}, {}, {})".format(*(int(want[i : i + 2], 16) for i in (1, 3, 5)))
