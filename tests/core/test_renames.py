"""An old keyword reaches the function under its new name, warns, and never silently wins over the new one."""

import pytest

from lens_squash.core.renames import renamed


@renamed(target="target_pos")
def _position(tokens, target_pos=-1):
    return tokens[target_pos]


def test_the_old_name_gives_the_same_answer_as_the_new_one_and_warns():
    tokens = [10, 11, 12, 13]
    with pytest.warns(DeprecationWarning, match="target_pos"):
        old = _position(tokens, target=1)
    assert old == _position(tokens, target_pos=1) == 11
    assert _position(tokens) == 13


def test_both_names_at_once_is_refused():
    with pytest.raises(TypeError, match="only target_pos"):
        _position([1, 2], target=0, target_pos=1)
