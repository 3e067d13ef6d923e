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
MAX_TEXT_BYTES = 2 << 30  # read whole into memory; larger is almost surely not meant as text


@dataclass(frozen=True)
class Text:
    name: str  # the spec the user gave (file path or builtin:…)
    text: str


def builtin_parts() -> dict[str, str]:
    """{"calib": …, "heldout": …}: the deterministic split of Python's documentation topics."""
    return {part: "\n\n".join(docs.values()) for part, docs in builtin_topics().items()}


def builtin_topics() -> dict[str, dict[str, str]]:
    """{"calib": {topic: text}, "heldout": {topic: text}}, topics in sorted-key order."""
    from pydoc_data.topics import topics

    docs = {k: topics[k].strip() for k in sorted(topics)}
    total = sum(len(d) for d in docs.values())
    calib, seen = {}, 0
    for key, doc in docs.items():
        if seen >= CALIB_SHARE * total:
            break
        calib[key] = doc
        seen += len(doc)
    return {"calib": calib, "heldout": {k: d for k, d in docs.items() if k not in calib}}


def load_text(spec: str) -> Text:
    """Read one data spec: a UTF-8 text file or `builtin:calib` / `builtin:heldout`."""
    if spec.startswith(BUILTIN_PREFIX):
        part = spec[len(BUILTIN_PREFIX):]
        parts = builtin_parts()
        if part not in parts:
            raise AdarouteError(f"unknown built-in data {spec!r}: use builtin:calib or builtin:heldout")
        return Text(spec, parts[part])
    if "\x00" in spec or not spec.strip():
        raise AdarouteError(f"{spec!r} is not a usable file name: give a UTF-8 text file")
    return Text(spec, _read_file(Path(spec)))


def load_texts(specs: list[str]) -> list[Text]:
    if not specs:
        raise AdarouteError("no data given: pass --data FILE (a UTF-8 text file) or builtin:heldout")
    return [load_text(s) for s in specs]


def _read_file(path: Path) -> str:
    try:
        if not path.exists():
            raise AdarouteError(f"no such file: {path}; check the path")
        if path.is_dir():
            raise AdarouteError(f"{path} is a directory: give a UTF-8 text file")
        if not path.is_file():  # a FIFO or device would block or never end
            raise AdarouteError(f"{path} is not a regular file (a pipe or device?): give a UTF-8 text file")
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise AdarouteError(f"{path} is larger than {MAX_TEXT_BYTES >> 30} GiB: give a smaller text file "
                                "(--max-tokens scores only the start of a file)")
        raw = path.read_bytes()
    except OSError as e:
        raise AdarouteError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from e
    if b"\x00" in raw:
        raise AdarouteError(f"{path} looks binary (it contains NUL bytes): give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdarouteError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8") from e
    if not text.strip():
        raise AdarouteError(f"{path} is empty: give a file with some text to evaluate")
    return text
