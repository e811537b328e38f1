"""What every sub-command shares: the model flags and their checks, loading, reports and figure files.

Checks run before the model loads and name the flag as typed; those of names and syntax import
nothing heavy (torch is imported only to ask whether a CUDA or MPS device exists).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from .cli_names import BACKENDS, COPY_PROMPT, DEFAULT_MODEL, FIGURE_FORMATS, canonical_dtype
from .core import validate

__all__ = [
    "ANSWER_TOKENS",
    "add_model_args",
    "add_prompt_args",
    "check_device",
    "check_model_flags",
    "check_prompt_flags",
    "check_room",
    "check_two_tokens",
    "claim_out_folder",
    "load",
    "write_figure_files",
    "write_report",
]

#: greedy tokens of the answer that demo and trace --generate print
ANSWER_TOKENS = 24


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=COPY_PROMPT, help="prompt text (default: the paper's copy prompt)")
    parser.add_argument("--raw", action="store_true", help="skip the chat template")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: the offline SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="float32, float64, bfloat16 or float16")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context length to load the model with")
    parser.add_argument("--device", default="cpu", help="torch device to load the model on: cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=None,
        help="HookedTransformer or TransformerBridge (default: hooked where TransformerLens has it)",
    )
    parser.add_argument(
        "--figures",
        default=None,
        help="also write every figure of the report as files, e.g. --figures png,svg,pdf "
        "(plotly's static export through kaleido and Chromium)",
    )


def check_model_flags(args) -> None:
    if not args.model.strip() or any(not ch.isprintable() for ch in args.model):
        raise ValueError(f"--model {args.model!r} is not a model name; pass e.g. --model tiny-random")
    try:
        canonical_dtype(args.dtype)
    except ValueError as err:
        raise ValueError(f"--dtype: {err}") from err
    validate.check_int(
        args.n_ctx,
        "--n-ctx",
        minimum=1,
        maximum=validate.MAX_N_CTX,
        hint="the number of positions to load the model with, e.g. --n-ctx 2048",
    )
    check_device(args.device)
    if args.figures is not None:
        args.figures = _check_figures(args.figures)


_DEVICE = re.compile(r"(?P<type>[a-z]+)(?::(?P<index>\d+))?")


def check_device(device: str) -> None:
    """A device torch can name and this machine has, checked before the model loads."""
    parsed = _DEVICE.fullmatch(device)
    if parsed is None:
        raise ValueError(f"--device {device!r} is not a torch device; pass e.g. --device cpu or --device cuda:0")
    kind, index = parsed["type"], parsed["index"]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: lens_squash runs on cpu, cuda or mps devices")
    if kind == "cpu":
        return
    import torch  # only to ask whether such a device exists

    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index is not None and int(index) >= count):
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA device(s) visible to torch; "
                "pass --device cpu, or a cuda:N below that count"
            )
    elif not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS backend is not available here; pass --device cpu")


def _check_figures(text: str) -> tuple[str, ...]:
    """The formats of ``--figures``, and the exporter and browser they need, before any work."""
    formats = validate.parse_names(text, FIGURE_FORMATS, "--figures", what="figure format")
    from .views.export import ExportError, require_exporter

    try:
        require_exporter()
    except ExportError as err:
        raise ValueError(f"--figures: {err}") from err
    return formats


def check_prompt_flags(args) -> None:
    validate.check_text(args.prompt, "--prompt")


def claim_out_folder(args, *, files=(), folders=()) -> None:
    """``--out`` for this run alone: what the run will write there can be written (``files`` and
    ``folders``; ``figures/`` too with ``--figures``), then the folder's lock is taken
    (:mod:`lens_squash.core.lock`). ``cli.main`` releases it when the command ends; a second run into
    the folder is refused meanwhile. Call it last among the checks that need no model."""
    from .core.lock import lock_folder

    folders = (*folders, "figures") if args.figures else tuple(folders)
    validate.check_out_paths(args.out, "--out", files=files, folders=folders)
    args.folder_lock = lock_folder(args.out, name="--out")


def load(args):
    """The model the flags name, with one line saying what was loaded and how long it took."""
    from .edge import models  # looked up at call time: tests replace models.load_model

    started = time.perf_counter()
    model = models.load_model(args.model, dtype=args.dtype, n_ctx=args.n_ctx, device=args.device, backend=args.backend)
    where = "" if args.device == "cpu" else f" on {args.device}"
    print(f"loaded {args.model} ({args.dtype}{where}) in {time.perf_counter() - started:.1f} s")
    return model


def check_room(model, n_prompt: int, n_new: int, flag: str) -> None:
    """The prompt plus ``n_new`` generated tokens must fit the loaded context (checked before any pass)."""
    if n_prompt + n_new > model.cfg.n_ctx:
        raise ValueError(
            f"{flag}: the prompt has {n_prompt} tokens and {n_new} more are generated, beyond the "
            f"loaded context n_ctx={model.cfg.n_ctx}; pass a larger --n-ctx or a shorter prompt"
        )


def check_two_tokens(model, prompt: str, *, chat: bool | None) -> None:
    """Sinks and sensitivities compare the first token with later ones: one token is not enough."""
    from .edge.prompts import as_tokens

    n_tokens = len(as_tokens(model, prompt, chat=chat))  # also refuses a prompt longer than n_ctx
    if n_tokens < 2:
        raise ValueError(
            f"--prompt {prompt!r} is {n_tokens} token; this analysis compares the first token with "
            "later ones, so it needs at least 2: pass a longer prompt (or drop --raw)"
        )


def write_figure_files(args, figures: dict, out) -> None:
    """``--figures``: every figure as files under ``out/figures`` (nothing when the flag is absent)."""
    if not args.figures:
        return
    if not figures:
        print("no figure files: these results have no figure to draw")
        return
    from .views.export import write_figures

    folder = Path(out) / "figures"
    written = write_figures(figures, folder, args.figures)
    print(f"wrote {sum(len(paths) for paths in written.values())} figure files to {folder}")


def write_report(args, out, sections, payload, *, title: str, metadata: dict):
    """``report.write_report`` into ``out``, then (``--figures``) every figure of the report as files."""
    from .views.report import write_report as write

    html_path, json_path = write(out, sections, payload, title=title, metadata=metadata)
    print(f"wrote {json_path} and {html_path}")
    figures = {f"{section.title}-{i}": fig for section in sections for i, fig in enumerate(section.figures)}
    write_figure_files(args, figures, out)
    return html_path, json_path
