"""Evaluation and calibration text: user files and the built-in documentation corpus.

Built-in data is the documentation prose that ships with Python (`pydoc_data.topics`), so nothing
is downloaded. Its documents are taken in sorted-key order and split once, at a document boundary,
into a calibration part (the first ~70 % of characters) and a held-out part (the rest). Routers are
calibrated on `builtin:calib` and judged on `builtin:heldout` and on text they have never seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaroute.errors import AdarouteError

BUILTIN_PREFIX = "builtin:"
CALIB_SHARE = 0.7


@dataclass(frozen=True)
class Text:
    name: str  # the spec the user gave (file path or builtin:…)
    text: str


def builtin_parts() -> dict[str, str]:
    """{"calib": …, "heldout": …}: the deterministic split of Python's documentation topics."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    total = sum(len(d) for d in docs)
    calib, seen = [], 0
    for doc in docs:
        if seen >= CALIB_SHARE * total:
            break
        calib.append(doc)
        seen += len(doc)
    return {"calib": "\n\n".join(calib), "heldout": "\n\n".join(docs[len(calib):])}


def load_text(spec: str) -> Text:
    """Read one data spec: a UTF-8 text file or `builtin:calib` / `builtin:heldout`."""
    if spec.startswith(BUILTIN_PREFIX):
        part = spec[len(BUILTIN_PREFIX):]
        parts = builtin_parts()
        if part not in parts:
            raise AdarouteError(f"unknown built-in data {spec!r}: use builtin:calib or builtin:heldout")
        return Text(spec, parts[part])
    return Text(spec, _read_file(Path(spec)))


def load_texts(specs: list[str]) -> list[Text]:
    if not specs:
        raise AdarouteError("no data given: pass --data FILE (a UTF-8 text file) or builtin:heldout")
    return [load_text(s) for s in specs]


def _read_file(path: Path) -> str:
    if not path.exists():
        raise AdarouteError(f"no such file: {path}; check the path")
    if path.is_dir():
        raise AdarouteError(f"{path} is a directory: give a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AdarouteError(f"cannot read {path}: {e.strerror}; check its permissions") from e
    if b"\x00" in raw[:65536]:
        raise AdarouteError(f"{path} looks binary (it contains NUL bytes): give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdarouteError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8") from e
    if not text.strip():
        raise AdarouteError(f"{path} is empty: give a file with some text to evaluate")
    return text
