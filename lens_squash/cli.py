"""The ``lens-squash`` command line: one sub-command per analysis, registered in :data:`COMMANDS`.

Each sub-command (a module ``lens_squash.cli_<command>``) first checks every flag
(:mod:`lens_squash.core.validate`; output paths included, so a bad value costs no model load), then
loads the model once, checks what needs the model (a layer index against its depth, the prompt's
tokens against its context) before any forward pass, runs the analyses, prints a short table and
writes its results atomically (JSON with provenance; HTML figures where the command makes them).
Refusals are one line naming the flag, exit status 2; Ctrl-C is one line saying what was saved and
how to resume, exit status 130. The parser is built from light name lists
(:mod:`lens_squash.cli_names`), so ``--help`` and refused flags never import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import cli_analyze as analyze
from . import cli_collapse as collapse
from . import cli_demo as demo
from . import cli_lab as lab
from . import cli_mixing as mixing
from . import cli_sinks as sinks
from . import cli_suite as suite
from . import cli_tasks as tasks
from . import cli_trace as trace
from .cli_common import check_model_flags
from .cli_names import COPY_PROMPT

__all__ = [
    "COMMANDS",
    "COPY_PROMPT",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL_ERROR",
    "EXIT_INTERRUPTED",
    "Command",
    "build_parser",
    "copy_prompt",
    "main",
]


def copy_prompt(n_ones: int = 12) -> str:
    """The paper's copying prompt; kept here for old notebooks, use ``lens_squash.copy_prompt``."""
    from .experiments.task_prompts import copy_prompt as build

    return build(n_ones)


def _saved_nothing(args) -> str:
    return f"nothing was saved ({args.command} writes its results when it finishes); run the same command again"


@dataclass(frozen=True)
class Command:
    """One sub-command: its parser, the checks run before the model loads, the handler, and what an
    interruption leaves behind (for the one-line Ctrl-C message)."""

    add_parser: Callable
    check: Callable
    run: Callable
    saved: Callable = _saved_nothing


#: sub-command name -> Command
COMMANDS: dict[str, Command] = {
    "trace": Command(trace.add_parser, trace.check, trace.run),
    "demo": Command(demo.add_parser, demo.check, demo.run),
    "analyze": Command(analyze.add_parser, analyze.check, analyze.run),
    "suite": Command(suite.add_parser, suite.check, suite.run, suite.saved),
    "tasks": Command(tasks.add_parser, tasks.check, tasks.run, tasks.saved),
    "collapse": Command(collapse.add_parser, collapse.check, collapse.run),
    "sinks": Command(sinks.add_parser, sinks.check, sinks.run),
    "mixing": Command(mixing.add_parser, mixing.check, mixing.run),
    "lab": Command(lab.add_parser, lab.check, lab.run, lab.saved),
}


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: …)`` to an option's help unless the help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS  # 0 is a real default
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _CommandParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-squash",
        description="Information over-squashing in TransformerLens models (Barbero et al., NeurIPS 2024). "
        "Every command works offline on the default model, SmolLM2-135M-Instruct; "
        "`lens-squash COMMAND -h` lists a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


#: exit status of a command interrupted by Ctrl-C (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130
#: exit status of refused input, as argparse uses for its own errors
EXIT_BAD_INPUT = 2
#: exit status of a bug (an exception that is not a refusal)
EXIT_INTERNAL_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        if hasattr(args, "model"):  # every command but lab, which trains its own models
            check_model_flags(args)
        command.check(args)  # before the model loads: bad input costs no load and no forward pass
        return command.run(args)
    except KeyboardInterrupt:
        print(f"lens-squash {args.command}: interrupted; {command.saved(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, RuntimeError, MemoryError, OSError) as err:
        # Bad input and refused requests: one clear line, no traceback, non-zero exit.
        print(f"lens-squash {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - a bug, not bad input: still one line, and how to see more
        if os.environ.get("LENS_SQUASH_DEBUG"):
            raise
        print(
            f"lens-squash {args.command}: internal error ({type(err).__name__}: {_one_line(err)}); "
            "please report it; rerun with LENS_SQUASH_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
    finally:  # the --out folder's lock (cli_common.claim_out_folder), if the command took one
        lock = getattr(args, "folder_lock", None)
        if lock is not None:
            lock.release()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
