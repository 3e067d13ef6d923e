"""Rewrite a GGUF file at another weight format (F32, Q8_0, Q4_0 or Q4_1), metadata kept.

Used to put the same model side by side at several precisions (``benchmarks/make_gguf.py``, the
equal-precision comparison with llama.cpp) and by tests. Matrices are dequantised and quantised again
with the ``gguf`` package (ggml's own rounding); a tensor already in the target format is copied
byte for byte, and one-dimensional tensors (norms) stay float32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILE_TYPES = {"F32": "ALL_F32", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}


def export_gguf(src: str | Path, dst: str | Path, fmt: str) -> Path:
    """Write ``src``'s model to ``dst`` with every matrix in ``fmt`` (a key of FILE_TYPES)."""
    import gguf

    if fmt not in FILE_TYPES:
        raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(FILE_TYPES)}")
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), arch=arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the writer adds the GGUF.* header fields and the architecture itself
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main, sub)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[fmt]))
    target = gguf.GGMLQuantizationType[fmt]
    for t in reader.tensors:
        data, kind = _convert(gguf, t, target)
        writer.add_tensor(t.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def _convert(gguf, t, target):
    """(array, raw type) of one tensor in the target format; shapes in numpy order (rows first)."""
    kind = t.tensor_type
    if kind == target:
        return np.array(t.data), kind
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (columns) first
    values = np.asarray(gguf.quants.dequantize(np.asarray(t.data), kind), dtype=np.float32).reshape(shape)
    if len(shape) == 1 or target == gguf.GGMLQuantizationType.F32:
        return values, gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(values, target), target
