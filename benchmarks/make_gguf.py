"""Write the embedded model (or any GGUF) at other weight formats, for equal-precision comparisons.

    python benchmarks/make_gguf.py [--src smollm2-135m] [--formats F32,Q8_0] [-o out/gguf]

Writes OUT/<name>.<FMT>.gguf per format (never commit these files). The embedded file is Q4_1 with a
Q8_0 embedding, so its F32 file holds exactly the float32 model adaroute loads, and its Q8_0 file
re-quantises those values to 8 bits (ggml's rounding, through the gguf package).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from adaroute.models.gguf_export import FILE_TYPES, export_gguf
from adaroute.models.loading import resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default="smollm2-135m", help="a .gguf file or the embedded alias")
    p.add_argument("--formats", default="F32,Q8_0", help=f"comma-separated, from {', '.join(FILE_TYPES)}")
    p.add_argument("-o", "--out", default="out/gguf")
    args = p.parse_args()
    source = resolve(args.src)
    src = source.directory / source.gguf_file
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in args.formats.split(","):
        dst = out / f"{Path(source.gguf_file).stem.rsplit('.', 1)[0]}.{fmt}.gguf"
        start = time.perf_counter()
        export_gguf(src, dst, fmt)
        print(f"{dst}  {dst.stat().st_size / 2**20:.1f} MiB  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
