"""The copying and counting experiments of Section 3, end to end: :func:`run_tasks` writes a folder.

The pieces, one module each: the paper's texts (:mod:`.task_texts`), the task registry and prompts
(:mod:`.task_prompts`), the answer parser (:mod:`.answers`), generation
(:mod:`lens_squash.edge.generation`), resumable evaluation (:mod:`.task_eval`), run fingerprints
(:mod:`.runs`) and the results table with its figures (:mod:`.task_results`); import each name from
its module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.records import provenance, to_jsonable, write_json_atomic
from ..core.validate import check_chat
from .runs import check_run_folder as _check_any_run_folder
from .task_eval import evaluate, run_fingerprint, tokenized_prompts
from .task_prompts import as_tuple, check_int, make_instances, task_spec
from .task_results import RENAMED_FIELDS, RESULT_KEY, TaskResults, save_results, summarize_results

__all__ = ["check_run_folder", "run_tasks"]


def check_run_folder(
    out_path: str | os.PathLike, fingerprint: dict[str, Any], *, partial: bool = False, loaded_as: str | None = None
) -> None:
    """:func:`lens_squash.experiments.runs.check_run_folder` for a tasks ``results.jsonl``."""
    _check_any_run_folder(
        out_path, fingerprint, key=RESULT_KEY, partial=partial, loaded_as=loaded_as, renamed_fields=RENAMED_FIELDS
    )


def _styles_for(task: str, styles: tuple[str, ...]) -> tuple[str, ...]:
    spec = task_spec(task)
    usable = tuple(m for m in styles if m in spec.styles)
    if not usable:
        raise ValueError(
            f"task {task!r} offers none of the styles {', '.join(styles)}; it offers {', '.join(spec.styles)} "
            "(copying tasks have only 'answer'), so add one of those to style"
        )
    return usable


#: what a finished run leaves beside results.jsonl and its fingerprint (figures.html is the command
#: line's page; a run started over must not leave the old run's behind either)
_FINAL_FILES = ("results.csv", "results.json", "figures.html")


def run_tasks(
    model,
    tasks: str | Iterable[str],
    lengths: Iterable[int],
    n_samples: int = 1,
    style: str | Iterable[str] = "answer",
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    chat: bool | None = None,
    overwrite: bool = False,
    loaded_as: str | None = None,
    progress: bool = True,
) -> TaskResults:
    """Evaluate several tasks, each in the requested styles it offers, and write the results to ``out_dir``.

    Into ``out_dir``: ``results.jsonl`` (rewritten atomically per batch; a rerun of the same run
    resumes from it, another run is refused unless ``overwrite=True``, see :func:`evaluate`),
    ``results.fingerprint.json`` (what made the rows), then, once every row is there,
    ``results.csv`` and ``results.json`` (``{"metadata": provenance, "summary": …, "rows": …}``), all
    atomically (the figures are the results' own, ``results.figures()``; ``lens-squash tasks`` also
    writes them to ``figures.html``). A style a task does not offer is skipped for that task
    (copying tasks are answer-only). Every argument, and the length of every prompt, is checked before the
    first reply is generated.
    """
    tasks, styles = as_tuple(tasks), as_tuple(style)
    lengths = as_tuple(lengths)
    if not tasks or not styles:
        raise ValueError("pass at least one task and one style, e.g. tasks=['copy_last'], style='answer'")
    plan = {task: _styles_for(task, styles) for task in tasks}  # validate everything before generating
    check_chat(chat)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("batch_size", batch_size, 1)
    everything = [
        i for task, task_styles in plan.items() for i in make_instances(task, lengths, n_samples, task_styles, seed)
    ]
    # every prompt tokenized once, here: no task may fail for length after another has run
    prompts = tokenized_prompts(model, everything, chat=chat, max_new_tokens=max_new_tokens)
    out = None if out_dir is None else Path(out_dir)
    if out is not None and overwrite:  # the old run's summaries must not outlive its rows
        for name in _FINAL_FILES:
            (out / name).unlink(missing_ok=True)
    fingerprint = run_fingerprint(model, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, seed=seed)
    frames, metas = [], []
    for index, (task, task_styles) in enumerate(plan.items()):
        part = evaluate(
            model, task, lengths, n_samples, style=task_styles, seed=seed, batch_size=batch_size,
            max_new_tokens=max_new_tokens, chat=chat, progress=progress, loaded_as=loaded_as,
            out_path=None if out is None else out / "results.jsonl", overwrite=overwrite and index == 0,
            _fingerprint=fingerprint, _prompts=prompts,
        )  # fmt: skip
        frames.append(part.frame)
        metas.append(part.provenance)
    args = {"tasks": list(tasks), "lengths": list(lengths), "n_samples": n_samples, "style": list(styles),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": seed, "chat": chat}  # fmt: skip
    meta = {**metas[0], "run_tasks": args, "out_dir": None if out is None else str(out)}
    args["fingerprint"] = metas[0]["fingerprint"]
    results = TaskResults(pd.concat(frames, ignore_index=True), meta)
    if out is not None:
        metadata = provenance(model, **args)
        save_results(results, out / "results.csv")
        payload = {"metadata": metadata, "summary": summarize_results(results).to_dict("records"),
                   "rows": results.frame.astype(object).where(results.frame.notna(), None).to_dict("records")}  # fmt: skip
        write_json_atomic(out / "results.json", to_jsonable(payload))
    return results
