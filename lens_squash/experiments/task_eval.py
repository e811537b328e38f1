"""Evaluating a model on the copying and counting tasks: greedy replies, scored, resumable.

:func:`evaluate` builds every (task, style, length, sample) prompt (:mod:`.task_prompts`), sends it
through the chat template when the tokenizer has one, generates greedy replies in left-padded batches
(:func:`lens_squash.edge.generation.greedy_generate`), reads the answers (:mod:`.answers`) and keeps
one row per prompt (:mod:`.task_results`). With ``out_path`` every finished batch is saved to a JSONL
file, and a rerun of the same run resumes from it; :func:`run_fingerprint` says what "the same run"
means here (the model, its weights, stop tokens, the generation settings, the task seed, versions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..core.progress import counter
from ..core.records import write_jsonl_atomic
from ..core.validate import check_chat
from ..edge.generation import greedy_generate, stop_ids
from ..edge.models import format_prompt
from .answers import parse_answer
from .runs import (
    check_run_folder,
    fingerprint_digest,
    fingerprint_path,
    model_fingerprint,
    package_versions,
    read_jsonl,
    record_fingerprint,
)
from .task_prompts import TaskInstance, check_int, make_instances
from .task_results import RENAMED_FIELDS, RESULT_KEY, TaskResults, results_frame

__all__ = ["evaluate", "generation_fingerprint", "run_fingerprint", "tokenized_prompts"]

#: the packages whose version can change a generated reply
_FINGERPRINT_PACKAGES = ("lens-squash", "torch", "transformer-lens", "transformers")


#: the packages whose version can change a generated reply
_FINGERPRINT_PACKAGES = ("lens-squash", "torch", "transformer-lens", "transformers")


def generation_fingerprint(*, max_new_tokens: int, batch_size: int, chat: bool | None, seed: int) -> dict[str, Any]:
    """The part of a run's fingerprint known without a model: decoding, batching, seed, versions."""
    return {
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                       "chat": chat},
        "tasks": {"seed": seed},
        "versions": package_versions(_FINGERPRINT_PACKAGES),
    }  # fmt: skip


def run_fingerprint(model, *, max_new_tokens: int, batch_size: int, chat: bool | None, seed: int) -> dict[str, Any]:
    """Everything that can change a row's reply: the model (name, weights hash, dtype, device, stop
    tokens), the generation and task parameters and the library versions.

    Which rows exist (tasks, styles, lengths, samples) is not part of it: every row is keyed by those,
    so a rerun may add lengths to a folder without mixing anything.
    """
    model_part = {**model_fingerprint(model), "stop_token_ids": stop_ids(model.tokenizer)}
    return {
        "model": model_part,
        **generation_fingerprint(max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, seed=seed),
    }


def _row(instance: TaskInstance, raw: str, n_prompt: int, n_new: int, fingerprint: str) -> dict:
    parsed = parse_answer(raw, instance.kind)
    error = None if parsed.value is None else abs(parsed.value - instance.truth)
    return {
        "task": instance.task,
        "style": instance.style,
        "length": instance.length,
        "sample": instance.sample,
        "seed": instance.seed,
        "prompt": instance.prompt,
        "raw_output": raw,
        "parsed_answer": parsed.value,
        "parse_status": parsed.status,
        "truth": instance.truth,
        "correct": parsed.value == instance.truth,
        "abs_error": error,
        "n_prompt_tokens": n_prompt,
        "n_new_tokens": n_new,
        "fingerprint": fingerprint,
    }


def _check_resumable(done: dict[tuple, dict], instances: list[TaskInstance], path: Path) -> None:
    for instance in instances:
        row = done.get(instance.key)
        if row is not None and row.get("prompt") != instance.prompt:
            raise ValueError(
                f"{path} already holds {instance.key} with a different prompt (another seed or prompt "
                "version); pass a new out_path or delete the file to start over"
            )


def _run_batch(
    model, batch: list[TaskInstance], prompts: dict[tuple, torch.Tensor], max_new_tokens: int, fingerprint: str
) -> list[dict]:
    ids = [prompts[inst.key] for inst in batch]
    outputs = greedy_generate(model, ids, max_new_tokens=max_new_tokens)
    texts = [model.tokenizer.decode(out.tolist(), skip_special_tokens=True) for out in outputs]
    return [_row(i, t, len(p), len(o), fingerprint) for i, t, p, o in zip(batch, texts, ids, outputs, strict=True)]


def tokenized_prompts(
    model, todo: list[TaskInstance], *, chat: bool | None, max_new_tokens: int
) -> dict[tuple, torch.Tensor]:
    """Every prompt still to run, tokenized up front, so that a prompt too long for the context is
    refused before the first batch is generated rather than after hours of work."""
    prompts = {inst.key: format_prompt(model, inst.prompt, chat=chat) for inst in todo}
    if prompts:
        key, longest = max(prompts.items(), key=lambda item: len(item[1]))
        if len(longest) + max_new_tokens > model.cfg.n_ctx:
            raise ValueError(
                f"the prompt of {key} has {len(longest)} tokens; with max_new_tokens={max_new_tokens} "
                f"(--max-new-tokens) it exceeds the model's n_ctx={model.cfg.n_ctx}; lower max_new_tokens "
                "or the task lengths, or load the model with a larger n_ctx (--n-ctx)"
            )
    return prompts


def evaluate(
    model,
    task: str | Iterable[str],
    lengths: Iterable[int],
    n_samples: int = 1,
    *,
    style: str | Iterable[str] = "answer",
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    out_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    loaded_as: str | None = None,
    progress: bool = True,
    on_batch: Callable[[int, list[dict]], None] | None = None,
    _fingerprint: dict[str, Any] | None = None,
    _prompts: dict[tuple, torch.Tensor] | None = None,
) -> TaskResults:
    """Prompt ``model`` with every (task, style, length, sample) and score its greedy replies.

    Prompts go through the chat template when the tokenizer has one (``chat=None``; see
    :func:`lens_squash.edge.models.format_prompt`), are generated ``batch_size`` at a time by
    :func:`greedy_generate`, and are parsed with :func:`parse_answer`. Every row carries the digest
    of the run's :func:`run_fingerprint`.

    With ``out_path`` (a ``.jsonl`` file) the file is rewritten atomically after each batch (a crash
    leaves the previous version), and a rerun skips the rows already there, so an interrupted run
    continues where it stopped — but only a rerun of the same run: the fingerprint is kept beside
    the file (:func:`fingerprint_path`) and a different one is refused (:func:`check_run_folder`);
    ``overwrite=True`` discards the old rows instead. ``loaded_as`` (the model name the user typed)
    is recorded so the command line can refuse a different ``--model`` before loading it.
    ``on_batch(index, rows)`` is called after each batch is saved. Copying tasks are deterministic:
    their samples repeat the same prompt. (``_fingerprint`` and ``_prompts`` are :func:`run_tasks`' way of
    hashing the weights and tokenizing every prompt once for all its tasks; they must be
    ``run_fingerprint`` and :func:`tokenized_prompts` of these very arguments.)
    """
    check_int("batch_size", batch_size, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_chat(chat)
    instances = make_instances(task, lengths, n_samples, style, seed)
    path = None if out_path is None else Path(out_path)
    if path is not None and path.suffix != ".jsonl":
        raise ValueError(f"out_path must end in .jsonl (rows are saved per batch), got {path}")
    fingerprint = _fingerprint or run_fingerprint(
        model, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, seed=seed
    )
    digest = fingerprint_digest(fingerprint)
    if path is not None:
        if overwrite:
            path.unlink(missing_ok=True)
            fingerprint_path(path).unlink(missing_ok=True)
        check_run_folder(path, fingerprint, key=RESULT_KEY, loaded_as=loaded_as, renamed_fields=RENAMED_FIELDS)
    done = read_jsonl(path, RESULT_KEY, renamed_fields=RENAMED_FIELDS) if path is not None else {}
    _check_resumable(done, instances, path)
    rows = {i.key: done[i.key] for i in instances if i.key in done}
    todo = [i for i in instances if i.key not in rows]
    if _prompts is None:  # refuse over-long prompts before any work
        _prompts = tokenized_prompts(model, todo, chat=chat, max_new_tokens=max_new_tokens)
    prompts = {i.key: _prompts[i.key] for i in todo}
    if path is not None:
        record_fingerprint(path, fingerprint, loaded_as, key=RESULT_KEY)
    with counter(
        desc="generate", total=len(instances), initial=len(rows), unit="prompt", enabled=None if progress else False
    ) as bar:
        for index, start in enumerate(range(0, len(todo), batch_size)):
            new_rows = _run_batch(model, todo[start : start + batch_size], prompts, max_new_tokens, digest)
            keyed = {tuple(r[k] for k in RESULT_KEY): r for r in new_rows}
            if path is not None:
                done.update(keyed)
                write_jsonl_atomic(path, done.values())
            rows.update(keyed)
            bar.update(len(new_rows))
            if on_batch is not None:
                on_batch(index, new_rows)
    meta = {"model": getattr(model.cfg, "model_name", "?"), "seed": seed, "max_new_tokens": max_new_tokens,
            "chat": chat, "out_path": None if path is None else str(path), "fingerprint": digest}  # fmt: skip
    return TaskResults(results_frame([rows[i.key] for i in instances]), meta)
