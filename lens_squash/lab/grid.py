"""A grid of lab runs over context length × depth × packing × seed, resumable run by run."""

from __future__ import annotations

import itertools
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..core.records import provenance
from .results import LabGrid
from .train import LabConfig, train_run

__all__ = ["grid_configs", "run_grid"]


def grid_configs(
    contexts: Sequence[int], depths: Sequence[int], packings: Sequence[str], seeds: Sequence[int], **settings
) -> list[LabConfig]:
    """Every combination, as :class:`~lens_squash.lab.train.LabConfig` (``settings``: the other fields)."""
    return [
        LabConfig(n_ctx=ctx, n_layers=depth, packing=packing, seed=seed, **settings)
        for ctx, depth, packing, seed in itertools.product(contexts, depths, packings, seeds)
    ]


def run_grid(
    folder: str | Path,
    configs: Sequence[LabConfig],
    *,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> LabGrid:
    """Train every config in its own sub-folder of ``folder`` (finished ones are read back, a
    half-trained one resumes from its checkpoint) and write ``grid.json``. ``jobs > 1`` trains that
    many runs at once in worker processes (one torch thread each); the runs keep their order."""
    folder = Path(folder)
    started = time.perf_counter()
    if jobs == 1:
        runs = []
        for i, config in enumerate(configs):
            if log is not None:
                log(f"[{i + 1}/{len(configs)}] {config.name()}")
            runs.append(train_run(config, folder / config.name(), log=log))
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch state in the workers
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_one_thread) as pool:
            futures = [pool.submit(_train_logged, config, folder / config.name()) for config in configs]
            runs = [future.result() for future in futures]
    grid = LabGrid(
        runs=tuple(runs),
        wall_s=time.perf_counter() - started,
        provenance=provenance(analysis="lab_grid", n_runs=len(runs)),
    )
    grid.save(folder / "grid.json")
    return grid


def _one_thread() -> None:
    torch.set_num_threads(1)


def _train_logged(config: LabConfig, folder: Path):
    return train_run(config, folder, log=lambda line: print(line, flush=True))
