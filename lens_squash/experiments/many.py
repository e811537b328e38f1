"""Many prompts, one table: :func:`analyze_many` runs :func:`lens_squash.experiments.analysis.analyze` on each
prompt and joins the per-variant summaries into one DataFrame (one row per prompt × variant).

Scale-out uses an existing engine, never a home-made one: pass ``executor=`` any object with
``concurrent.futures.Executor``'s ``submit`` (a ``ProcessPoolExecutor``, a
``dask.distributed.Client`` over a ``LocalCluster`` or a real cluster). Each prompt becomes one
submitted task; results are collected in prompt order. A live model cannot sensibly travel with
every task (its weights would be pickled each time), so with an executor the model is named by a
picklable :class:`ModelSpec` (or a picklable zero-argument factory) and each worker process loads
it once, through :func:`lens_squash.edge.models.load_model`, and keeps it in a per-process cache.

The same model in another process gives the same numbers: tiny models are seeded, the offline
SmolLM2 loads from one cached conversion, and the sketched Jacobian's probes are seeded. A torch
computation can still round differently with a different number of intra-op threads; Dask's
workers run with ``OMP_NUM_THREADS=1``, so compare them with a one-thread in-process run (the
tests and ``benchmarks/many.py`` do).
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..core.display import compact_repr
from ..core.progress import progress
from ..core.results import Result
from ..edge.models import DEFAULT_MODEL, load_model, resolve_dtype
from .analysis import Analysis, analyze

__all__ = ["ManyAnalyses", "ModelSpec", "analyze_many", "cached_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A picklable recipe for :func:`lens_squash.edge.models.load_model`: what a worker loads once."""

    name: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    n_ctx: int = 2048

    def __post_init__(self):
        # store the dtype by name: a string pickles anywhere and keys the worker cache stably
        object.__setattr__(self, "dtype", str(resolve_dtype(self.dtype)).removeprefix("torch."))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec.name must be a model name such as {DEFAULT_MODEL!r}, got {self.name!r}")
        if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"ModelSpec.n_ctx must be a positive int, got {self.n_ctx!r}")

    def load(self):
        return load_model(self.name, dtype=self.dtype, device=self.device, n_ctx=self.n_ctx)


# one model per spec per process: a worker that runs many prompts loads its model once. Each model
# has its own lock, held for a whole analysis: tracing adds hooks to the shared model, so two threads
# analysing on one model at once would read each other's activations
_MODELS: dict[Any, tuple[Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def _cache_key(source) -> Any:
    # a factory unpickled in a worker is a fresh object on every task (a functools.partial has no
    # __eq__), so key it by its pickled bytes: equal bytes, same model
    return source if isinstance(source, ModelSpec) else ("factory", pickle.dumps(source))


def _cached(source) -> tuple[Any, threading.Lock]:
    key = _cache_key(source)
    with _MODELS_LOCK:  # a worker with several threads must still load only once
        if key not in _MODELS:
            model = source.load() if isinstance(source, ModelSpec) else source()
            _MODELS[key] = (model, threading.Lock())
        return _MODELS[key]


def cached_model(source: ModelSpec | Callable[[], Any]):
    """The model ``source`` describes, loaded on the first call in this process and reused after."""
    return _cached(source)[0]


def _analyze_in_worker(source, prompt, kwargs: dict[str, Any]) -> Analysis:
    """The task each executor runs: the worker's cached model, then one ``analyze`` (one at a time
    per model in a process: threads of one worker take turns, processes run side by side)."""
    model, lock = _cached(source)
    with lock:
        return analyze(model, prompt, **kwargs)


@dataclass(frozen=True, eq=False)
class ManyAnalyses(Result):
    """``analyze`` over several prompts: the joined table and every :class:`Analysis`, in prompt order."""

    #: one row per prompt × variant: ``prompt_index``, ``prompt``, ``n_tokens``, ``predicted_token``,
    #: then the columns of :meth:`Analysis.summary`
    frame: pd.DataFrame
    analyses: tuple[Analysis, ...]
    prompts: tuple[Any, ...]

    @property
    def provenance(self) -> dict[str, Any]:
        """The first analysis's provenance (one model made them all) and the number of prompts."""
        first = self.analyses[0].provenance if self.analyses else {}
        return {**first, "n_prompts": len(self.analyses)}

    def __len__(self) -> int:
        return len(self.analyses)

    def __getitem__(self, index: int) -> Analysis:
        return self.analyses[index]

    def to_frame(self) -> pd.DataFrame:
        """:attr:`frame`: one row per prompt × variant."""
        return self.frame

    def report(self, path: str | os.PathLike, *, analyses: bool = True) -> Path:
        """Write the many-prompt report to ``path``: per-variant Spearman across prompts, the prompts
        from best to worst and, with ``analyses``, each prompt's own report in ``<stem>_analyses/``
        (linked from its row). Returns the page's path."""
        path = Path(path)
        links = None
        if analyses:
            folder = path.with_name(f"{path.stem}_analyses")
            links = []
            for index, analysis in enumerate(self.analyses):
                analysis.report(folder / f"prompt-{index:03d}.html")
                links.append(f"{folder.name}/prompt-{index:03d}.html")
        return self.plot("page", links=links).write(path)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        head = f"<b>lens_squash ManyAnalyses</b>: {len(self)} prompts, {len(self.frame)} rows"
        return head + self.frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", escape=True)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return " ".join(str(int(t)) for t in torch.as_tensor(prompt).flatten())  # token ids, shown as ids


def _frame(prompts: Sequence[Any], analyses: Sequence[Analysis]) -> pd.DataFrame:
    parts = []
    for index, (prompt, analysis) in enumerate(zip(prompts, analyses, strict=True)):
        summary = analysis.summary()
        summary.insert(0, "prompt_index", index)
        summary.insert(1, "prompt", _prompt_text(prompt))
        summary.insert(2, "n_tokens", analysis.trace.n_tokens)
        summary.insert(3, "predicted_token", analysis.trace.predicted_token)
        parts.append(summary)
    return pd.concat(parts, ignore_index=True)


def _checked_prompts(prompts) -> tuple[Any, ...]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError(
            "prompts must be a list of prompts, not one string; use analyze() for one prompt "
            "or wrap it: analyze_many(model, [prompt])"
        )
    try:
        prompts = tuple(prompts)
    except TypeError:
        raise TypeError(
            f"prompts must be an iterable of strings or token-id tensors, got {type(prompts).__name__}"
        ) from None
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, torch.Tensor)):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}; pass text or a tensor of token ids")
    return prompts


def _is_model(obj) -> bool:
    return isinstance(obj, torch.nn.Module)


def _named(model_or_factory):
    """A model name (``"smollm2-135m-instruct"``, ``"tiny-random"``) becomes its :class:`ModelSpec`."""
    return ModelSpec(name=model_or_factory) if isinstance(model_or_factory, str) else model_or_factory


def _source_for_executor(model_or_factory):
    if _is_model(model_or_factory):
        raise TypeError(
            "with executor=, pass a picklable ModelSpec (e.g. ModelSpec(name='tiny-random')) or a picklable "
            "zero-argument factory, not a loaded model: each worker loads the model once itself"
        )
    if not isinstance(model_or_factory, ModelSpec) and not callable(model_or_factory):
        raise TypeError(
            f"model_or_factory must be a model, a model name, a ModelSpec or a factory, got {type(model_or_factory).__name__}"
        )
    try:
        pickle.dumps(model_or_factory)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise TypeError(
            f"the model factory cannot be pickled for the workers ({err}); use a ModelSpec or a function "
            "defined at module level (not a lambda or a local function)"
        ) from err
    return model_or_factory


def _local_model(model_or_factory):
    if _is_model(model_or_factory):
        return model_or_factory
    if isinstance(model_or_factory, ModelSpec) or callable(model_or_factory):
        return cached_model(model_or_factory)  # run in this thread only: no lock needed
    raise TypeError(
        f"model_or_factory must be a model, a model name, a ModelSpec or a factory, got {type(model_or_factory).__name__}"
    )


def _results_in_order(futures: list, on_result) -> tuple[Analysis, ...]:
    """Each future's result, in submission order; on the first error the prompts not yet started
    are cancelled (``cancel`` exists on concurrent.futures and Dask futures alike) and it is raised."""
    try:
        waiting = progress(futures, desc="prompts", total=len(futures), unit="prompt")
        return tuple(_reported(i, future.result(), on_result) for i, future in enumerate(waiting))
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def _reported(index: int, analysis: Analysis, on_result) -> Analysis:
    if on_result is not None:
        on_result(index, analysis)
    return analysis


def analyze_many(
    model_or_factory,
    prompts,
    *,
    executor=None,
    on_result: Callable[[int, Analysis], None] | None = None,
    **analyze_kwargs,
) -> ManyAnalyses:
    """Run :func:`~lens_squash.experiments.analysis.analyze` on every prompt; one table, every ``Analysis`` kept.

    ``model_or_factory`` is a loaded model, a model name (as :func:`~lens_squash.edge.models.load_model`
    takes it), a :class:`ModelSpec`, or a zero-argument factory. Without
    ``executor`` the prompts run one after the other in this process. With ``executor`` (anything
    with ``submit(fn, *args)`` returning a future with ``.result()``: ``concurrent.futures``
    executors, ``dask.distributed.Client``) each prompt is one task; the model must then be a
    ``ModelSpec`` or a picklable factory, loaded once per worker process (threads of one worker
    share it and take turns, since tracing hooks the model: use one thread per worker and more
    workers to run prompts side by side). ``analyze_kwargs`` go to
    ``analyze`` unchanged (``variants``, ``jacobian_mode``, ``n_probes``, ``chat``, ``target``).
    Results come back in prompt order; a task's error is raised here, as the executor reports it.
    ``on_result(index, analysis)`` is called for each prompt as its result arrives, in prompt order
    (``lens-squash suite`` saves each one there, so an interrupted run resumes); a progress bar counts
    the prompts.
    """
    prompts = _checked_prompts(prompts)
    model_or_factory = _named(model_or_factory)
    if executor is None:
        model = _local_model(model_or_factory)
        analyses = tuple(
            _reported(i, analyze(model, prompt, **analyze_kwargs), on_result)
            for i, prompt in enumerate(progress(prompts, desc="prompts", unit="prompt"))
        )
    else:
        if not callable(getattr(executor, "submit", None)):
            raise TypeError(
                f"executor must have a submit() method (a concurrent.futures.Executor or a "
                f"dask.distributed.Client), got {type(executor).__name__}"
            )
        source = _source_for_executor(model_or_factory)
        futures = [executor.submit(_analyze_in_worker, source, prompt, analyze_kwargs) for prompt in prompts]
        analyses = _results_in_order(futures, on_result)
    return ManyAnalyses(_frame(prompts, analyses), analyses, prompts)
