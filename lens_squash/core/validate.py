"""Argument checks shared by the command line and the Python API, run before any model work.

Every check raises a ``TypeError`` (wrong kind of value) or a ``ValueError`` (right kind, bad value)
whose message names the argument as the caller spelled it — ``name="--samples"`` on the command
line, ``name="n_samples"`` in Python — says what was received and how to fix it. Checks are pure
functions of their arguments (the path checks read the file system, and probe a directory's
writability with a temporary file they remove again); none of them touches a model.

Why probe instead of ``os.access``: as root ``os.access`` says yes to ``/proc`` and to read-only
mounts, and the only reliable answer to "can I create a file here" is to try.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and numpy are imported where tensors are checked: the CLI's checks need neither
    import torch

__all__ = [
    "BIDI_CONTROLS",
    "MAX_N_CTX",
    "check_chat",
    "check_float",
    "check_int",
    "check_names",
    "check_out_dir",
    "check_out_file",
    "check_out_paths",
    "check_position",
    "check_prompt",
    "check_target",
    "check_text",
    "check_token_ids",
    "check_variants",
    "parse_int_list",
    "parse_names",
]

#: Unicode bidirectional embedding, override and isolate controls (U+202A–U+202E, U+2066–U+2069):
#: they reorder how text is *displayed*, so a prompt shown with them can read differently from
#: what the model saw (the "Trojan Source" trick)
BIDI_CONTROLS: frozenset[str] = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))

#: the largest context length accepted anywhere: beyond it the [layer, head, n, n] attention stacks
#: the analyses keep would need terabytes, and rotary tables alone take seconds to build
MAX_N_CTX = 131_072

# file-name components longer than this fail with ENAMETOOLONG on every common file system
_NAME_MAX = 255


# --------------------------------------------------------------------------------------------------
# numbers


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True as a sample count is a mistake, not a number
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; ``hint`` is appended to the range error."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    low_ok = minimum is None or value >= minimum
    high_ok = maximum is None or value <= maximum
    if not (low_ok and high_ok):
        bounds = (
            f"between {minimum} and {maximum}"
            if minimum is not None and maximum is not None
            else f">= {minimum}"
            if minimum is not None
            else f"<= {maximum}"
        )
        raise ValueError(f"{name} must be {bounds}, got {value}{'; ' + hint if hint else ''}")
    return value


def check_float(
    value: Any, name: str, *, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a finite ``float`` in the interval ``low … high`` (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


def parse_int_list(
    text: Any, name: str, *, minimum: int = 1, maximum: int | None = None, max_count: int = 10_000
) -> list[int]:
    """``"5,10,20"`` or ``"5:40:5"`` (start:stop:step, stop included) as a list of distinct ints."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be text like '5,10,20' or '5:40:5', got {type(text).__name__}")
    example = f"{name} must look like '5,10,20' or '5:40:5' (start:stop:step, stop included)"
    parts = text.split(":") if ":" in text else [p for p in text.split(",") if p.strip()]
    try:
        numbers_ = [int(p) for p in parts]
    except ValueError as err:
        raise ValueError(f"{example}, got {text!r}") from err
    if ":" in text:
        if len(numbers_) != 3:
            raise ValueError(f"{example}, got {text!r}")
        start, stop, step = numbers_
        if step <= 0 or start > stop:
            raise ValueError(f"{name}: a range start:stop:step needs start <= stop and step >= 1, got {text!r}")
        if (stop - start) // step + 1 > max_count:
            raise ValueError(f"{name}: {text!r} asks for more than {max_count} lengths; use a larger step")
        numbers_ = list(range(start, stop + 1, step))
    if not numbers_:
        raise ValueError(f"{example}, got {text!r} (no numbers)")
    if len(set(numbers_)) != len(numbers_):
        raise ValueError(f"{name} repeats a value in {text!r}; list each length once")
    for value in numbers_:
        check_int(value, f"every value of {name}", minimum=minimum, maximum=maximum)
    return numbers_


# --------------------------------------------------------------------------------------------------
# names


def check_names(names: Any, known: Iterable[str], name: str, *, what: str = "name") -> tuple[str, ...]:
    """A non-empty sequence of distinct strings, each one of ``known``; returned as a tuple."""
    known = tuple(known)
    if isinstance(names, str):
        raise TypeError(f"{name} must be a list of {what}s, got the single string {names!r}; pass [{names!r}]")
    if not isinstance(names, Iterable):
        raise TypeError(f"{name} must be a list of {what}s from {', '.join(known)}, got {type(names).__name__}")
    names = tuple(names)
    if not names:
        raise ValueError(f"{name} is empty; pass at least one {what}, from {', '.join(known)}")
    for item in names:
        if not isinstance(item, str):
            raise TypeError(f"every {what} in {name} must be a string, got {item!r} ({type(item).__name__})")
    unknown = [item for item in names if item not in known]
    if unknown:
        raise ValueError(
            f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
            f"{name}; choose from {', '.join(known)}"
        )
    repeated = sorted({item for item in names if names.count(item) > 1})
    if repeated:
        raise ValueError(f"{name} lists {', '.join(map(repr, repeated))} more than once; name each {what} once")
    return names


def parse_names(text: Any, known: Iterable[str], name: str, *, what: str = "name") -> tuple[str, ...]:
    """A comma-separated command-line list (``"paper,rollout"``) checked by :func:`check_names`."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be comma-separated text, got {type(text).__name__}")
    return check_names([part.strip() for part in text.split(",") if part.strip()], known, name, what=what)


def check_variants(variants: Any, known: Iterable[str], name: str = "variants") -> tuple[str, ...]:
    """Path-sum variant names: a non-empty list of distinct registered names."""
    return check_names(variants, known, name, what="variant")


def check_chat(chat: Any, name: str = "chat") -> bool | None:
    """``None`` (the tokenizer's chat template when it has one), ``True`` or ``False``; nothing else."""
    if chat is not None and not isinstance(chat, bool):
        raise TypeError(
            f"{name} must be None (use the chat template if the tokenizer has one), True or "
            f"False, got {chat!r} ({type(chat).__name__})"
        )
    return chat


# --------------------------------------------------------------------------------------------------
# prompts and token ids


def check_text(text: Any, name: str = "prompt") -> str:
    """Non-empty text that UTF-8 can encode (no unpaired surrogates); other characters are the user's."""
    if text is None:
        raise TypeError(f"{name} is None; pass the text to analyse (a str) or its token ids (a 1-D tensor)")
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(f"{name} is bytes; decode it first, e.g. {name}=data.decode('utf-8')")
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty or only whitespace; pass some text, e.g. the paper's copying prompt")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} holds a character UTF-8 cannot encode (an unpaired surrogate at index "
            f"{err.start}); pass valid Unicode text"
        ) from err
    return text


def check_prompt(prompt: Any, name: str = "prompt") -> str | torch.Tensor:
    """One prompt: text (see :func:`check_text`) or integer token ids of shape ``[pos]`` or ``[1, pos]``.

    A numpy integer array counts as a tensor. Lists are refused whatever they hold: a list of strings is several prompts (call once per
    prompt), and a list of ids is ambiguous with a batch (wrap it in ``torch.tensor``).
    """
    import torch

    if type(prompt).__module__ == "numpy" and hasattr(prompt, "dtype"):  # ids from numpy are as good as a tensor
        prompt = torch.from_numpy(prompt)
    if isinstance(prompt, torch.Tensor):
        return _check_id_tensor(prompt, name)
    if isinstance(prompt, (list, tuple)):
        if prompt and all(isinstance(p, str) for p in prompt):
            raise TypeError(
                f"{name} is a {type(prompt).__name__} of {len(prompt)} strings, but one prompt is "
                "analysed per call; call once per prompt"
            )
        raise TypeError(
            f"{name} is a {type(prompt).__name__}; pass text (a str) or token ids as a tensor, e.g. torch.tensor(ids)"
        )
    return check_text(prompt, name)


def _check_id_tensor(ids: torch.Tensor, name: str) -> torch.Tensor:
    import torch

    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(
            f"{name} must hold integer token ids, got a {str(ids.dtype).removeprefix('torch.')} "
            "tensor; convert with .long() only if the values are really ids"
        )
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(
            f"{name} must be one prompt of shape [pos] or [1, pos], got shape {tuple(ids.shape)}; "
            "analyse one prompt per call"
        )
    if ids.numel() == 0:
        raise ValueError(f"{name} has no tokens; pass at least one token id")
    return ids


def check_token_ids(ids: Any, d_vocab: int, name: str = "tokens") -> torch.Tensor:
    """Integer token ids ``[pos]`` (or ``[1, pos]``, squeezed) all in ``[0, d_vocab)``, as int64."""
    import torch

    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a tensor of token ids, got {type(ids).__name__}; wrap a list with torch.tensor(ids)"
        )
    d_vocab = check_int(d_vocab, "d_vocab", minimum=1)
    ids = _check_id_tensor(ids, name)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= d_vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} holds token id {bad}, outside this model's vocabulary [0, {d_vocab}); "
            "tokenize with the model's own tokenizer (model.to_tokens)"
        )
    return ids.long()


def check_position(pos: Any, n: int, name: str = "position") -> int:
    """A position in a sequence of ``n`` tokens, Python-style negatives allowed; returned in ``[0, n)``."""
    n = check_int(n, "n", minimum=1)
    pos = check_int(pos, name)
    if not -n <= pos < n:
        raise ValueError(f"{name}={pos} is outside a sequence of {n} tokens; pass 0 … {n - 1}, or -1 for the last")
    return pos % n


def check_target(target: Any, n: int, name: str = "target") -> int:
    """The token whose sensitivity is compared: it needs at least two positions (itself and one before)."""
    index = check_position(target, n, name)
    if index < 1:
        raise ValueError(
            f"{name}={target} is the first token: only one position (itself) would be compared; "
            "pass a later position, e.g. -1 for the last token"
        )
    return index


# --------------------------------------------------------------------------------------------------
# output paths


def _check_path_text(path: Any, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    text = os.fspath(path)
    if isinstance(text, bytes):
        raise TypeError(f"{name} must be a str path, got bytes")
    if not text.strip():
        raise ValueError(f"{name} is empty; pass a folder or file name")
    if "\x00" in text:
        raise ValueError(f"{name} contains a NUL character, which no file system accepts in a path")
    long = [part for part in Path(text).parts if len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX]
    if long:
        raise ValueError(f"{name} has a component of {len(long[0])} characters; file systems allow {_NAME_MAX} bytes")
    return Path(text)


def _existing_ancestor(path: Path, name: str) -> Path:
    """The nearest ancestor that exists; refuse when it is not a directory (``/dev/null/sub``)."""
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"{name} {str(path)!r} cannot be created: {str(ancestor)!r} exists and is not a folder; pick another path"
        )
    return ancestor


def _probe_writable(folder: Path, path: Path, name: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".lens_squash_probe.", dir=folder)
    except OSError as err:
        raise ValueError(
            f"{name} {str(path)!r} is not writable (cannot create files in {str(folder)!r}: "
            f"{err.strerror}); pick a folder you can write to"
        ) from err
    os.close(fd)
    os.unlink(probe)


def check_out_dir(path: Any, name: str = "out_dir") -> Path:
    """A folder results can be written into: an existing writable folder, or one that can be created
    under a writable existing ancestor. Creates nothing (the probe file is removed again)."""
    path = _check_path_text(path, name)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is an existing file, not a folder; pass a folder path")
    _probe_writable(_existing_ancestor(path, name), path, name)
    return path


def check_out_file(path: Any, name: str = "path", *, suffixes: Sequence[str] = ()) -> Path:
    """A file path that can be written (replacing a previous file is fine, a folder is not)."""
    path = _check_path_text(path, name)
    if path.is_dir():
        raise ValueError(
            f"{name} {str(path)!r} is a folder; pass a file path inside it, e.g. "
            f"{str(path / ('out' + (suffixes[0] if suffixes else '.json')))!r}"
        )
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: replacing it would be vandalism
        raise ValueError(f"{name} {str(path)!r} exists and is not a regular file; pass a file path")
    if suffixes and path.suffix not in suffixes:
        raise ValueError(f"{name} {str(path)!r} must end in {' or '.join(suffixes)}")
    _probe_writable(_existing_ancestor(path.parent, name), path, name)
    return path


def check_out_paths(out: Any, name: str = "out_dir", *, files: Iterable[str] = (), folders: Iterable[str] = ()) -> Path:
    """What a run will create under ``out`` (a folder, checked by :func:`check_out_dir`) can be created:
    each of ``files`` is a regular file or absent, each of ``folders`` a writable folder or absent.

    Checked before the model loads, so that ``OUT/table.csv`` existing as a folder or
    ``OUT/analyses`` as a file is refused at once, not as an ``errno`` after the work.
    """
    out = check_out_dir(out, name)
    for folder in folders:
        path = out / folder
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"{name}: {str(path)!r} exists and is not a folder, but the run writes its files into it; "
                "move it away or pass another folder"
            )
        if path.is_dir():
            _probe_writable(path, path, name)
    for file in files:
        path = out / file
        if path.is_dir() or (path.exists() and not path.is_file()):
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise ValueError(
                f"{name}: {str(path)!r} is {kind}, but the run writes a file there; move it away or pass another folder"
            )
    return out
