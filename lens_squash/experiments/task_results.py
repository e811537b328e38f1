"""The results of the copying and counting tasks: one tidy frame, its files, its summary and figures.

:class:`TaskResults` holds one row per (task, style, length, sample) with the reply, the parsed answer
and whether it is right (columns :data:`RESULT_COLUMNS`); :func:`save_results` / :func:`load_results`
write and read it as CSV, JSON or JSONL, atomically; :func:`summarize_results` gives accuracy, mean
absolute error and the unparsable rate per task, style and length; :data:`TASK_FIGURES` names the
paper's figures (2, 3, 4 and 11) that :meth:`TaskResults.plot` draws. Every row carries its run's
fingerprint digest (:mod:`.runs`), and rows of different runs are refused where they would be mixed.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.display import compact_repr
from ..core.records import atomic_write
from ..core.results import Result
from ..core.stored import read_json
from .runs import jsonl_rows
from .task_prompts import as_tuple

__all__ = [
    "RENAMED_FIELDS",
    "RESULT_COLUMNS",
    "RESULT_KEY",
    "TASK_FIGURES",
    "TaskFigure",
    "TaskResults",
    "check_single_run",
    "results_frame",
    "load_results",
    "save_results",
    "summarize_results",
    "task_figure",
    "task_figure_rows",
]

#: the columns of every results frame, in order
RESULT_COLUMNS: tuple[str, ...] = (
    "task", "style", "length", "sample", "seed", "prompt", "raw_output", "parsed_answer", "parse_status",
    "truth", "correct", "abs_error", "n_prompt_tokens", "n_new_tokens", "fingerprint",
)  # fmt: skip
RESULT_KEY = ("task", "style", "length", "sample")
#: fields renamed since results were first written (old name -> new): old files still load and resume
RENAMED_FIELDS = {"mode": "style"}


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a frame with :data:`RESULT_COLUMNS` and their dtypes (nullable ints where unparsable)."""
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    for column in ("length", "sample", "seed", "truth", "n_prompt_tokens", "n_new_tokens"):
        frame[column] = frame[column].astype("int64")
    for column in ("parsed_answer", "abs_error"):
        frame[column] = frame[column].astype("Int64")
    frame["correct"] = frame["correct"].astype(bool)
    # files written before rows were fingerprinted have no such field: None, not NaN
    frame["fingerprint"] = frame["fingerprint"].astype(object).where(frame["fingerprint"].notna(), None)
    return frame


def check_single_run(frame: pd.DataFrame, source: str = "these results") -> None:
    """Refuse rows made by different runs (different fingerprints), e.g. two results files merged."""
    digests = {d for d in frame.get("fingerprint", pd.Series(dtype=object)) if d is not None}
    if len(digests) > 1:
        raise ValueError(
            f"{source} mix rows of {len(digests)} different runs (fingerprints {', '.join(sorted(digests))}); "
            "summarise each run separately (filter on the fingerprint column), or pass allow_mixed=True "
            "if mixing is what you want"
        )


@dataclass(frozen=True, eq=False)
class TaskResults(Result):
    """The tidy results of ``evaluate``: one row per (task, style, length, sample)."""

    frame: pd.DataFrame
    provenance: dict = field(default_factory=dict)

    def accuracy_by_length(self) -> pd.DataFrame:
        """Accuracy, mean absolute error and unparsable rate per task, style and length."""
        frame = self.frame.assign(
            abs_error=self.frame["abs_error"].astype("float64"),  # NaN where unparsable, skipped by mean
            unparsable=self.frame["parse_status"] == "unparsable",
        )
        grouped = frame.groupby(["task", "style", "length"], sort=True)
        return grouped.agg(
            n=("correct", "size"),
            accuracy=("correct", "mean"),
            mean_abs_error=("abs_error", "mean"),
            unparsable=("unparsable", "mean"),
        ).reset_index()

    def save(self, path: str | os.PathLike, *, heavy: bool = True) -> Path:
        """``.csv`` / ``.jsonl``: the frame alone (:func:`save_results`); any other suffix: the whole
        result, provenance included, as the result contract's exact JSON (:meth:`load` reads both)."""
        if Path(path).suffix in (".csv", ".jsonl"):
            return save_results(self, path)
        return super().save(path, heavy=heavy)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskResults:
        """What :meth:`save` wrote (``.csv`` / ``.jsonl`` through :func:`load_results`)."""
        if Path(path).suffix in (".csv", ".jsonl"):
            return load_results(path)
        return super().load(path)

    def to_frame(self) -> pd.DataFrame:
        """:attr:`frame`: one row per (task, style, length, sample)."""
        return self.frame

    def figures(self) -> dict[str, Any]:
        """Every figure of :data:`TASK_FIGURES` that has rows to show, by kind."""
        shown = {
            kind: set(_figure_tasks(self.frame, kind)) - _REFERENCE_TASKS.get(kind, set()) for kind in TASK_FIGURES
        }
        return {kind: self.plot(kind) for kind in TASK_FIGURES if shown[kind]}

    def _repr_html_(self) -> str:
        frame = self.frame
        unparsable = int((frame["parse_status"] == "unparsable").sum())
        model = self.provenance.get("model", "?")
        head = (
            f"<p><b>TaskResults</b>: {len(frame)} rows, model {html.escape(str(model))}, "
            f"tasks {html.escape(', '.join(map(str, frame['task'].unique())))}; "
            f"accuracy {frame['correct'].mean():.3f}, unparsable {unparsable}</p>"
            if len(frame)
            else "<p><b>TaskResults</b>: no rows</p>"
        )
        return head + self.accuracy_by_length().to_html(index=False, float_format="%.3f", max_rows=30)

    __repr__ = compact_repr


def save_results(results: TaskResults | pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write results to ``.csv``, ``.json`` (records) or ``.jsonl``: a temp file, then ``os.replace``."""
    frame = results.frame if isinstance(results, TaskResults) else results
    path = Path(path)
    writers = {
        ".csv": lambda tmp: frame.to_csv(tmp, index=False),
        ".json": lambda tmp: frame.to_json(tmp, orient="records", indent=1, force_ascii=False),
        ".jsonl": lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False),
    }
    if path.suffix not in writers:
        raise ValueError(f"unknown results format {path.suffix!r} for {path}; use .csv, .json or .jsonl")
    atomic_write(path, writers[path.suffix])
    return path


def load_results(path: str | os.PathLike, *, allow_mixed: bool = False) -> TaskResults:
    """Read a file written by :func:`save_results` or ``evaluate``'s ``out_path``.

    Rows of different runs (different fingerprints) are refused unless ``allow_mixed=True``."""
    path = Path(path)
    if path.suffix == ".csv":
        rows = pd.read_csv(
            path,
            keep_default_na=False,
            na_values={"parsed_answer": [""], "abs_error": [""]},
            dtype={"fingerprint": str},  # an all-digit hex digest must stay text
        )
        rows = rows.astype({"prompt": str, "raw_output": str}).to_dict("records")
    elif path.suffix == ".json":
        rows = read_json(path)  # errors name the file
    elif path.suffix == ".jsonl":
        # every row: a repeated key from another run must stay visible
        rows = jsonl_rows(path, RESULT_KEY, renamed_fields=RENAMED_FIELDS)[0]
    else:
        raise ValueError(f"unknown results format {path.suffix!r} for {path}; use .csv, .json or .jsonl")
    for row in rows:  # CSV/JSON readers give NaN or float for the nullable integer columns
        for old, new in RENAMED_FIELDS.items():
            if old in row and new not in row:
                row[new] = row.pop(old)
        row["fingerprint"] = row.get("fingerprint") or None
        for column in ("parsed_answer", "abs_error"):
            value = row.get(column)
            row[column] = None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
    frame = results_frame(rows)
    if not allow_mixed:
        check_single_run(frame, str(path))
    return TaskResults(frame, {"source": str(path)})


@dataclass(frozen=True)
class TaskFigure:
    """One of the paper's task figures: which figure, the tasks it shows (legend order), its chart
    (``"accuracy"``, ``"abs_error"`` or ``"histogram"``: a key of the views' ``TASK_CHARTS``) and its title."""

    paper_figure: str
    tasks: tuple[str, ...]
    chart: str
    title: str


#: figure kind -> what it shows
TASK_FIGURES: dict[str, TaskFigure] = {
    "accuracy": TaskFigure("Fig. 2", ("copy_first", "copy_last", "copy_last_hint", "copy_alternating"),
                           "accuracy", "Copying: accuracy against sequence length (Fig. 2)"),
    "abs_error": TaskFigure("Fig. 3", ("sum_ones", "count_ones", "count_bernoulli", "count_car"),
                            "abs_error", "Counting: mean absolute error against length (Fig. 3)"),
    "histogram": TaskFigure("Fig. 4", ("sum_ones", "count_ones", "count_bernoulli", "count_car"),
                            "histogram", "Counting: distribution of the answers (Fig. 4)"),
    # copy_last is the reference prompt the two reorderings of Appendix C.5 are compared against
    "prompt_types": TaskFigure("Fig. 11", ("copy_type1", "copy_type2", "copy_last"),
                               "accuracy", "Copying: prompt Type 1 vs Type 2 (Fig. 11, App. C.5)"),
}  # fmt: skip
# tasks a figure shows only for comparison: alone they do not make the figure worth drawing
_REFERENCE_TASKS: dict[str, set[str]] = {"prompt_types": {"copy_last"}}


def _figure_tasks(frame: pd.DataFrame, kind: str, tasks: Iterable[str] | None = None) -> list[str]:
    """The tasks figure ``kind`` shows: ``tasks`` if given, else its default tasks present in ``frame``."""
    if kind not in TASK_FIGURES:
        raise ValueError(f"unknown figure kind {kind!r}; choose one of {', '.join(TASK_FIGURES)}")
    present = set(frame["task"])
    wanted = as_tuple(tasks) if tasks is not None else TASK_FIGURES[kind].tasks
    return [t for t in wanted if t in present]


def task_figure(results: TaskResults | pd.DataFrame, kind: str = "accuracy", *, tasks=None):
    """Figure ``kind`` of :data:`TASK_FIGURES` for the rows of its tasks (a plotly Figure): the same
    as ``results.plot(kind, tasks=tasks)``, for a frame too."""
    results = results if isinstance(results, TaskResults) else TaskResults(results)
    return results.plot(kind, tasks=tasks)


def task_figure_rows(results: TaskResults | pd.DataFrame, kind: str, tasks=None) -> tuple[pd.DataFrame, TaskFigure]:
    """The rows figure ``kind`` draws (its tasks only) and what it is; refused when none are there.
    The chart itself is drawn by the views (``lens_squash.views.task_figures.TASK_CHARTS``)."""
    frame = results.frame if isinstance(results, TaskResults) else results
    chosen = _figure_tasks(frame, kind, tasks)
    if not chosen:
        wanted = ", ".join(as_tuple(tasks) if tasks is not None else TASK_FIGURES[kind].tasks)
        raise ValueError(
            f"figure {kind!r} needs rows of one of the tasks {wanted}, but the results hold only "
            f"{', '.join(map(str, frame['task'].unique())) or 'no rows'}; run those tasks or pass tasks=[...]"
        )
    # keep the figure's task order: the builders group series in order of appearance/sort
    return frame[frame["task"].isin(chosen)], TASK_FIGURES[kind]


def summarize_results(
    results: TaskResults | pd.DataFrame | str | os.PathLike, *, allow_mixed: bool = False
) -> pd.DataFrame:
    """Accuracy, mean absolute error and unparsable rate per task, style and length.

    Takes results, their frame, or a file written by :func:`save_results` / ``run_tasks``.
    Rows of different runs (different fingerprints) are refused unless ``allow_mixed=True``.
    """
    if isinstance(results, (str, os.PathLike)):
        results = load_results(results, allow_mixed=allow_mixed)
    if isinstance(results, pd.DataFrame):
        results = TaskResults(results)
    if not allow_mixed:
        check_single_run(results.frame)
    return results.accuracy_by_length()
