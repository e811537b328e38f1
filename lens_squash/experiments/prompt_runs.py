"""Many prompts from a file, analysed into one table, resumably: what ``lens-squash suite`` runs.

:func:`run_prompt_file` sends every prompt of a prompt file (:mod:`.prompt_file`) through
:func:`lens_squash.experiments.many.analyze_many` and writes, into ``out_dir``, atomically:

- ``analyses/<id>.json``: each prompt's :class:`~lens_squash.experiments.analysis.Analysis`
  (``Analysis.load`` reads it back; the heavy per-head tensors are left out, as in every report);
- ``prompts.jsonl``: one row per finished prompt (its id, text, chat setting, token count,
  prediction, its summary table and the run's fingerprint digest), rewritten after each prompt;
- ``prompts.fingerprint.json``: what made the rows (:mod:`.runs`): the model (name, weights hash,
  dtype, device), the analysis settings (variants, Jacobian mode, probes) and the library versions;
- once every prompt is done, ``table.csv`` and ``table.json``: one row per prompt × variant.

A rerun with the same fingerprint skips the prompts already done (an interrupted run continues); a
different fingerprint, or an id that was run with another prompt text, is refused unless
``overwrite=True``, which discards the old results first.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.records import (
    atomic_write,
    provenance,
    to_jsonable,
    write_json_atomic,
    write_jsonl_atomic,
)
from .prompt_file import FilePrompt
from .runs import (
    check_run_folder,
    fingerprint_digest,
    fingerprint_path,
    model_fingerprint,
    package_versions,
    read_jsonl,
    record_fingerprint,
)

__all__ = [
    "ROW_KEY",
    "analysis_file",
    "check_prompt_folder",
    "prompt_rows_path",
    "run_prompt_file",
    "settings_fingerprint",
    "suite_fingerprint",
    "table_frame",
]

#: what identifies a row of ``prompts.jsonl``
ROW_KEY = ("id",)
#: the packages whose version can change an analysis
_PACKAGES = ("lens-squash", "torch", "transformer-lens", "transformers")
#: what a finished run writes beside the rows (removed by overwrite, so none outlives its rows)
_FINAL_FILES = ("table.csv", "table.json")


def prompt_rows_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "prompts.jsonl"


def settings_fingerprint(*, variants, jacobian_mode: str | None, n_probes: int) -> dict[str, Any]:
    """The part of a run's fingerprint known without a model: the analysis settings and versions."""
    return {
        "analysis": {
            "variants": None if variants is None else list(variants),
            "jacobian_mode": jacobian_mode,
            "n_probes": n_probes,
        },
        "versions": package_versions(_PACKAGES),
    }


def suite_fingerprint(model, **settings) -> dict[str, Any]:
    """Everything that can change a prompt's analysis: the model and :func:`settings_fingerprint`."""
    return {"model": model_fingerprint(model), **settings_fingerprint(**settings)}


def check_prompt_folder(
    out_dir,
    prompts: tuple[FilePrompt, ...],
    fingerprint: dict[str, Any],
    *,
    partial: bool = False,
    loaded_as: str | None = None,
) -> dict[tuple, dict]:
    """Refuse to resume ``out_dir`` when its rows were made by another run, or when an id of
    ``prompts`` was run with another text or chat setting; returns the rows already done."""
    path = prompt_rows_path(out_dir)
    check_run_folder(path, fingerprint, key=ROW_KEY, partial=partial, loaded_as=loaded_as)
    done = read_jsonl(path, ROW_KEY, repair=False)
    for prompt in prompts:
        row = done.get((prompt.id,))
        if row is not None and (row.get("prompt"), row.get("chat")) != (prompt.prompt, prompt.chat):
            raise ValueError(
                f"line {prompt.line}: id {prompt.id!r} was run before with another prompt or chat setting "
                f"(see {path}); give the prompt a new id, or pass --overwrite (overwrite=True) to start over"
            )
    return done


def analysis_file(ident: str) -> str:
    """Where prompt ``ident``'s analysis is saved, relative to the output folder."""
    return f"analyses/{_file_name(ident)}"


def _file_name(ident: str) -> str:
    # ids are free text: a readable, safe stem plus a hash, so distinct ids never share a file
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ident)[:40].strip("._") or "prompt"
    return f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}.json"


def _row(prompt: FilePrompt, analysis, digest: str, file: str) -> dict[str, Any]:
    summary = analysis.summary()
    return {
        "id": prompt.id, "prompt": prompt.prompt, "chat": prompt.chat, "fingerprint": digest,
        "n_tokens": analysis.trace.n_tokens, "predicted_token": analysis.trace.predicted_token,
        "analysis_file": file, "summary": to_jsonable(summary.astype(object).where(summary.notna(), None)
                                                      .to_dict("records")),
    }  # fmt: skip


def table_frame(prompts: tuple[FilePrompt, ...], rows: dict[tuple, dict]) -> pd.DataFrame:
    """One row per prompt × variant, in file order: ``id``, ``prompt_index``, ``prompt``, ``n_tokens``,
    ``predicted_token``, then the columns of ``Analysis.summary``."""
    parts = []
    for index, prompt in enumerate(prompts):
        row = rows[(prompt.id,)]
        part = pd.DataFrame(row["summary"])
        for at, (column, value) in enumerate(
            (
                ("id", prompt.id),
                ("prompt_index", index),
                ("prompt", prompt.prompt),
                ("n_tokens", row["n_tokens"]),
                ("predicted_token", row["predicted_token"]),
            )
        ):
            part.insert(at, column, value)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _start_over(out: Path) -> None:
    path = prompt_rows_path(out)
    for stale in (path, fingerprint_path(path), *(out / name for name in _FINAL_FILES)):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "analyses", ignore_errors=True)


def run_prompt_file(
    model,
    prompts: tuple[FilePrompt, ...],
    out_dir: str | os.PathLike,
    *,
    variants=None,
    jacobian_mode: str | None = "exact",
    n_probes: int = 64,
    overwrite: bool = False,
    loaded_as: str | None = None,
) -> pd.DataFrame:
    """Analyse every prompt not yet done, saving each as it finishes; return the whole table."""
    from .many import analyze_many

    out = Path(out_dir)
    if overwrite:
        _start_over(out)
    settings = {"variants": variants, "jacobian_mode": jacobian_mode, "n_probes": n_probes}
    fingerprint = suite_fingerprint(model, **settings)
    digest = fingerprint_digest(fingerprint)
    done = check_prompt_folder(out, prompts, fingerprint, loaded_as=loaded_as)
    path = prompt_rows_path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_fingerprint(path, fingerprint, loaded_as, key=ROW_KEY)
    todo = [p for p in prompts if (p.id,) not in done]
    for chat in dict.fromkeys(p.chat for p in todo):  # one analyze_many per chat setting, file order kept
        group = [p for p in todo if p.chat == chat]

        def save(index: int, analysis, group=group) -> None:
            prompt, name = group[index], _file_name(group[index].id)
            analysis.save(out / "analyses" / name, heavy=False)  # the file first: a row never lacks it
            done[(prompt.id,)] = _row(prompt, analysis, digest, f"analyses/{name}")
            write_jsonl_atomic(path, done.values())

        analyze_many(
            model,
            [p.prompt for p in group],
            on_result=save,
            variants=variants,
            jacobian_mode=jacobian_mode,
            n_probes=n_probes,
            chat=chat,
        )
    table = table_frame(prompts, done)
    atomic_write(out / "table.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_json_atomic(
        out / "table.json",
        {
            "metadata": provenance(model, command="suite", fingerprint=digest, **settings),
            "rows": table.astype(object).where(table.notna(), None).to_dict("records"),
        },
    )
    return table
