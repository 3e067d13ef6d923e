"""A GGUF file's header: its scalar metadata and whether the file holds all its tensor data.

Commands check options against the model's context length, and a damaged file should be named
as such, before the slow load. ``gguf.GGUFReader`` parses every field and builds a view of every
tensor (about 2.5 s on the embedded model), and transformers reports a truncated file as a numpy
reshape error; so the header is walked here with the format's documented layout (magic, version,
counts, key/value pairs, tensor infos), taking the type tables from the ``gguf`` package.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from adaroute.errors import AdarouteError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, object]  # scalar and string metadata (arrays are skipped)
    tensors: int
    data_end: int  # bytes the file must have to hold every tensor
    size: int  # bytes it has
    # (name, dims with ne0 first, GGML type, absolute byte offset) per tensor, in file order
    tensor_infos: tuple[tuple[str, tuple[int, ...], int, int], ...] = ()

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def context_length(self) -> int | None:
        value = self.fields.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None


class _Truncated(Exception):
    pass


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse ``path``'s header or raise a one-line ``AdarouteError`` saying what is wrong with it."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _Cursor(buf).header()
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.strerror and not path.stat().st_size == 0:
            raise AdarouteError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from e
        raise AdarouteError(f"{path} is not a GGUF file we can read ({_reason(e)}): give a valid .gguf file") from None
    except _Truncated:
        raise AdarouteError(f"{path} is truncated or damaged (its header is cut short): re-download or "
                            "re-export the GGUF file") from None
    if header.data_end > header.size:
        raise AdarouteError(f"{path} is truncated ({header.size} bytes, its tensors need {header.data_end}): "
                            "re-download or re-export the GGUF file")
    return header


def _reason(e: Exception) -> str:
    return "empty file" if "empty file" in str(e) or "cannot mmap an empty" in str(e) else str(e)


class _Cursor:
    """Reads the header from a memory map (struct at offsets: ~100x faster than file reads here)."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def header(self) -> GGUFHeader:
        import gguf

        if self.unpack("<I") != gguf.GGUF_MAGIC:
            raise ValueError("bad magic number")
        version = self.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        n_tensors, n_kv = self.unpack("<Q"), self.unpack("<Q")
        if n_tensors > len(self.buf) or n_kv > len(self.buf):
            raise _Truncated
        fields = {}
        for _ in range(n_kv):
            key = self.string()
            value = self.value(self.unpack("<I"))
            if value is not None:
                fields[key] = value
        data_end, infos = 0, []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.unpack("<Q") for _ in range(self.unpack("<I"))]
            kind, offset = self.unpack("<I"), self.unpack("<Q")
            data_end = max(data_end, offset + _nbytes(gguf, kind, dims))
            infos.append((name, tuple(dims), kind, offset))
        align = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self.pos // align) * align  # tensor data begins at the next aligned offset
        infos = tuple((name, dims, kind, start + offset) for name, dims, kind, offset in infos)
        return GGUFHeader(fields, n_tensors, start + data_end, len(self.buf), infos)

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item in _SCALARS:  # fixed-size items: skip them at once
            self.skip(count * struct.calcsize(_SCALARS[item]))
        elif item == _STRING:
            for _ in range(count):
                self.skip(self.unpack("<Q"))
        else:
            for _ in range(count):
                self.value(item)
        return None

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.buf):
            raise _Truncated

    def unpack(self, fmt: str):
        try:
            value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        except struct.error:
            raise _Truncated from None
        self.pos += struct.calcsize(fmt)
        return value


def _nbytes(gguf, kind: int, dims: list[int]) -> int:
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown tensor type {kind}") from None
    count = 1
    for d in dims:
        count *= d
    return count // block * type_size
