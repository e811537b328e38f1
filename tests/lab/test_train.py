"""The lab's training: the loss falls, a resumed run equals an uninterrupted one, a saved model
gives the same numbers, and a grid reads finished runs back."""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

from lens_squash.edge.lab_models import first_token_attention, lab_backend
from lens_squash.lab.grid import grid_configs, run_grid
from lens_squash.lab.results import LabGrid, LabRun
from lens_squash.lab.train import LabConfig, load_trained, measure_mixing, train_run

SMALL = dict(n_ctx=16, n_layers=1, d_model=32, n_heads=2, d_vocab=16, batch_size=8, eval_rows=8, mixing_prompts=2)


@functools.cache
def _trained() -> tuple[LabRun, str]:
    folder = tempfile.mkdtemp(prefix="lab-test-")
    return train_run(LabConfig(steps=60, eval_every=20, lr=1e-2, warmup=5, **SMALL), folder), folder


def test_training_loss_decreases():
    run, _ = _trained()
    assert run.steps.tolist() == [0, 20, 40, 60]
    assert float(run.loss[-1]) < float(run.loss[0]) - 0.3
    assert float(run.loss[0]) == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.5)  # untrained: near uniform


def test_a_saved_model_gives_the_same_numbers():
    run, folder = _trained()
    model, config = load_trained(folder)
    heads, loss = first_token_attention(model, _held_out(config))
    assert torch.equal(heads, run.head_attention[-1]) and loss == float(run.loss[-1])
    ratios, first = measure_mixing(model, config)
    assert ratios == run.spread_ratio
    assert torch.equal(first.change["mask"], run.mixing.change["mask"])
    again = LabRun.load(f"{folder}/run.json")
    assert torch.equal(again.head_attention, run.head_attention) and again.spread_ratio == run.spread_ratio


def _held_out(config):
    from lens_squash.lab.train import _held_out

    return _held_out(config)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    config = LabConfig(steps=20, eval_every=10, packing="packed", **SMALL)
    straight = train_run(config, tmp_path / "straight")

    class Stop(Exception):
        pass

    def stop_at_first_checkpoint(line):
        raise Stop(line)

    with pytest.raises(Stop):
        train_run(config, tmp_path / "resumed", log=stop_at_first_checkpoint)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists() and not (tmp_path / "resumed" / "run.json").exists()
    resumed = train_run(config, tmp_path / "resumed")
    assert torch.equal(resumed.loss, straight.loss) and torch.equal(resumed.head_attention, straight.head_attention)
    with pytest.raises(ValueError, match="another config"):
        (tmp_path / "resumed" / "run.json").unlink()
        train_run(LabConfig(steps=30, eval_every=10, packing="packed", **SMALL), tmp_path / "resumed")


def test_sink_share_is_the_share_of_heads_above_the_threshold():
    run, _ = _trained()
    expected = [(h > 0.3).double().mean().item() for h in run.head_attention]
    assert run.sink_share.tolist() == expected


def test_grid_reads_finished_runs_back(tmp_path):
    configs = grid_configs(
        [16],
        [1],
        ["bos", "packed"],
        [0],
        steps=4,
        eval_every=2,
        **{k: v for k, v in SMALL.items() if k not in ("n_ctx", "n_layers")},
    )
    grid = run_grid(tmp_path, configs)
    assert isinstance(grid, LabGrid) and len(grid.to_frame()) == 2
    assert set(grid.to_frame().packing) == {"bos", "packed"}
    assert "spread_ratio_no_bos" in grid.to_frame() and grid.to_frame().spread_ratio_no_bos.isna().sum() == 1
    again = run_grid(tmp_path, configs)
    assert [r.wall_s for r in again.runs] == [r.wall_s for r in grid.runs]  # read back, not retrained
    assert LabGrid.load(tmp_path / "grid.json").to_frame().equals(again.to_frame())


def test_a_checkpoint_of_the_other_backend_is_refused_in_one_line(tmp_path):
    """A hooked checkpoint's state-dict keys are not a bridge's: loading it says so instead of a key error."""
    _, folder = _trained()
    payload = torch.load(f"{folder}/checkpoint.pt", map_location="cpu", weights_only=False)
    model, _ = load_trained(folder)
    assert payload["state"]["backend"] == lab_backend(model)
    payload["state"]["backend"] = {"hooked": "bridge", "bridge": "hooked"}[lab_backend(model)]
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="retrain it in a new folder") as refused:
        load_trained(tmp_path)
    assert len(str(refused.value).splitlines()) == 1
