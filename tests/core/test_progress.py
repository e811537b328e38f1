"""Progress bars: shown where asked, silenced by every switch, never on standard output."""

from __future__ import annotations

import pytest

from lens_squash.core.progress import bars_enabled, progress, silenced


def test_progress_yields_every_item_in_order_whether_shown_or_not(monkeypatch):
    items = list(range(7))
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    assert list(progress(items, desc="shown")) == items
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "0")
    assert list(progress(items, desc="hidden")) == items


def test_bars_go_to_stderr_and_never_to_stdout(monkeypatch, capsys):
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    for _ in progress(range(3), desc="counting", total=3):
        pass
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "counting" in captured.err


@pytest.mark.parametrize("setting", ["0", "off", "false"])
def test_environment_switch_silences(monkeypatch, capsys, setting):
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", setting)
    assert not bars_enabled()
    list(progress(range(3), desc="quiet"))
    assert "quiet" not in capsys.readouterr().err


def test_silenced_nests_and_restores(monkeypatch):
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    assert bars_enabled()
    with silenced():
        with silenced():
            assert not bars_enabled()
        assert not bars_enabled()
    assert bars_enabled()


def test_explicit_argument_wins(monkeypatch, capsys):
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    list(progress(range(2), desc="forced-off", enabled=False))
    assert "forced-off" not in capsys.readouterr().err


def test_off_by_default_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("LENS_SQUASH_PROGRESS", raising=False)
    # pytest's capture replaces stderr with a non-terminal stream, as a CI log or a pipe would
    assert not bars_enabled()


def test_counter_counts_on_stderr_and_does_nothing_when_off(monkeypatch, capsys):
    from lens_squash.core.progress import counter

    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    with counter(desc="batches", total=5, initial=2) as bar:
        bar.update(3)
    captured = capsys.readouterr()
    assert captured.out == "" and "batches" in captured.err and "2/5" in captured.err  # starts at initial
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "0")
    with counter(desc="quiet-batches", total=5) as bar:
        bar.update(5)
    assert "quiet-batches" not in capsys.readouterr().err
