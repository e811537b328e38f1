"""analyze_many: one table across prompts, equal to one-by-one analyze, and equal bit for bit when
the prompts are spread over worker processes (a Dask LocalCluster, a ProcessPoolExecutor)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pandas as pd
import pytest
import torch

from lens_squash.edge.models import load_model
from lens_squash.experiments.analysis import analyze
from lens_squash.experiments.many import ManyAnalyses, ModelSpec, analyze_many

SPEC = ModelSpec(name="tiny-random", dtype="float32", n_ctx=128)
# different lengths, so an out-of-order result could not pass for the right one
PROMPTS = ("Consider 1 1 1 0. What is the last digit?", "Count the ones: 1 1 1 1 1", "abc", "What is 7 + 5?")
KWARGS = {"jacobian_mode": "exact"}

#: how many times this process ran the counting factory (read back from each worker)
LOADS = 0


def counting_factory():
    """A module-level, picklable factory that counts its calls in the process that runs it."""
    global LOADS
    LOADS += 1
    return load_model("tiny-random", n_ctx=128)


def loads_here() -> tuple[int, int]:
    return os.getpid(), LOADS


@pytest.fixture
def one_thread():
    """Dask's workers run with one intra-op thread; a torch reduction may round differently with two,
    so the in-process reference runs with one as well (and the setting is restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return SPEC.load()


def assert_same_analysis(a, b):
    """Bit-for-bit equality of everything numeric an Analysis holds that does not depend on the clock."""
    assert torch.equal(a.trace.tokens, b.trace.tokens)
    assert torch.equal(a.trace.patterns, b.trace.patterns)
    assert a.bounds.keys() == b.bounds.keys() and a.bounds
    for name in a.bounds:
        assert torch.equal(a.bounds[name].bound, b.bounds[name].bound), name
    assert torch.equal(a.jacobian.spectral, b.jacobian.spectral)
    assert torch.equal(a.jacobian.frobenius, b.jacobian.frobenius)
    assert torch.equal(a.spectral.dobrushin, b.spectral.dobrushin)
    pd.testing.assert_frame_equal(a.summary(), b.summary(), check_exact=True)


def assert_same_many(a: ManyAnalyses, b: ManyAnalyses):
    assert len(a) == len(b) == len(PROMPTS)
    for x, y in zip(a.analyses, b.analyses, strict=True):
        assert_same_analysis(x, y)
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=True)


def test_in_process_equals_one_by_one_analyze(model):
    many = analyze_many(model, PROMPTS, **KWARGS)
    for prompt, got in zip(PROMPTS, many.analyses, strict=True):
        assert_same_analysis(got, analyze(model, prompt, **KWARGS))
    variants = list(many.analyses[0].bounds)
    frame = many.frame
    assert len(frame) == len(PROMPTS) * len(variants)  # one row per prompt × variant
    assert list(frame["prompt_index"]) == [i for i in range(len(PROMPTS)) for _ in variants]
    assert list(frame["prompt"]) == [p for p in PROMPTS for _ in variants]
    assert list(frame["variant"]) == variants * len(PROMPTS)
    for i, analysis in enumerate(many.analyses):
        rows = frame[frame["prompt_index"] == i].drop(columns=["prompt_index", "prompt", "n_tokens", "predicted_token"])
        pd.testing.assert_frame_equal(rows.reset_index(drop=True), analysis.summary(), check_exact=True)
        assert set(frame.loc[frame["prompt_index"] == i, "n_tokens"]) == {analysis.trace.n_tokens}
    assert len({a.trace.n_tokens for a in many.analyses}) == len(PROMPTS)
    assert many[2] is many.analyses[2] and "4 prompts" in many._repr_html_()


def test_a_spec_or_a_factory_in_process_gives_the_same_numbers(model, one_thread):
    reference = analyze_many(model, PROMPTS[:2], **KWARGS)
    by_spec = analyze_many(SPEC, PROMPTS[:2], **KWARGS)
    for x, y in zip(reference.analyses, by_spec.analyses, strict=True):
        assert_same_analysis(x, y)


def test_token_id_prompts_are_accepted_and_shown_as_ids(model):
    tokens = torch.tensor([1, 5, 9, 2])
    many = analyze_many(model, [tokens], jacobian_mode=None, variants=["rollout"])
    assert many.frame["prompt"].tolist() == ["1 5 9 2"] and many.frame["n_tokens"].tolist() == [4]


def test_bad_input_is_refused_with_the_fix(model):
    with pytest.raises(TypeError, match="not one string"):
        analyze_many(model, "one prompt")
    with pytest.raises(ValueError, match="empty"):
        analyze_many(model, [])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        analyze_many(model, ["a", 3])
    with pytest.raises(TypeError, match="ModelSpec"):
        analyze_many(model, ["a"], executor=ProcessPoolExecutor(max_workers=1))
    with pytest.raises(TypeError, match="pickled"):
        analyze_many(lambda: model, ["a"], executor=ProcessPoolExecutor(max_workers=1))
    with pytest.raises(TypeError, match="submit"):
        analyze_many(SPEC, ["a"], executor=object())
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(name="tiny-random", dtype="float8")


def test_threads_sharing_one_cached_model_take_turns_and_errors_come_back(model, one_thread):
    # tracing hooks the shared model: without the per-model lock the threads would see each other's
    # activations. Four threads on one cached model must give the in-process numbers exactly.
    reference = analyze_many(model, PROMPTS, **KWARGS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = analyze_many(SPEC, PROMPTS, executor=pool, **KWARGS)
        assert_same_many(reference, threaded)
        too_long = " ".join(["one"] * 400)  # more tokens than the spec's n_ctx = 128
        with pytest.raises(ValueError, match="n_ctx"):
            analyze_many(SPEC, [PROMPTS[0], too_long], executor=pool, **KWARGS)


@pytest.mark.slow  # starts worker processes: tens of seconds (pyproject's 'more than a few seconds')
def test_a_process_pool_gives_the_same_numbers(model, one_thread):
    reference = analyze_many(model, PROMPTS, **KWARGS)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from this one
    with ProcessPoolExecutor(
        max_workers=2, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        remote = analyze_many(SPEC, PROMPTS, executor=pool, **KWARGS)
    assert_same_many(reference, remote)


@pytest.mark.slow  # starts worker processes: tens of seconds (pyproject's 'more than a few seconds')
def test_a_two_worker_dask_cluster_gives_the_same_numbers_and_loads_once_per_worker(model, one_thread):
    # a dev dependency (pip install "dask[distributed]"): a missing one fails the test, never skips it
    from dask import distributed

    reference = analyze_many(model, PROMPTS, **KWARGS)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        remote = analyze_many(SPEC, PROMPTS, executor=client, **KWARGS)
        by_factory = analyze_many(counting_factory, PROMPTS, executor=client, **KWARGS)
        loads = client.run(loads_here)  # {worker address: (pid, loads in that process)}
        threads = client.run(torch.get_num_threads)
    assert_same_many(reference, remote)
    assert_same_many(reference, by_factory)
    assert set(threads.values()) == {1}
    pids = {pid for pid, _ in loads.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two separate worker processes
    counts = [n for _, n in loads.values()]
    assert max(counts) == 1 and sum(counts) >= 1  # each worker that ran a prompt loaded the model once


def test_on_result_sees_every_analysis_in_prompt_order_in_process_and_on_an_executor(model, one_thread):
    """``on_result(index, analysis)`` is how the suite command saves each prompt as it finishes."""
    for executor in (None, ThreadPoolExecutor(max_workers=2)):
        seen: list = []
        source = model if executor is None else SPEC
        many = analyze_many(
            source, PROMPTS, executor=executor, on_result=lambda i, a, seen=seen: seen.append((i, a)), **KWARGS
        )
        assert [i for i, _ in seen] == list(range(len(PROMPTS)))
        assert all(a is b for (_, a), b in zip(seen, many.analyses, strict=True))
        if executor is not None:
            executor.shutdown()
