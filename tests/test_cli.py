"""The command line's help: plain text, and every option that has a default (zero included) says it."""

from __future__ import annotations

import pytest

from lens_squash.cli import COMMANDS, build_parser, main


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_plain_text(capsys):
    text = _help(capsys)
    assert ":data:" not in text and "``" not in text
    assert all(name in text for name in COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_with_a_default_shows_it(capsys, command):
    text = " ".join(_help(capsys, command).split())  # argparse wraps lines
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if not action.option_strings or action.default is None or action.default is False or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        if "default" not in action.help:  # those that describe their default in words keep the words
            assert f"(default: {action.default})" in text, (command, action.option_strings[0])
