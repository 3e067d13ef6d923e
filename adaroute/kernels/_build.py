"""Builds a kernel source into a shared library on first use and caches it on disk.

The library is compiled for the machine it runs on (``-march=native``), so the cache key covers the
source, the flags, the compiler and the CPU. ``ADAROUTE_EXT_DIR`` overrides the cache location;
``ADAROUTE_NATIVE=0`` builds for the baseline instruction set (the portable, non-AVX-512 code);
``ADAROUTE_CXXFLAGS`` adds compiler flags (e.g. ``-mno-avx512vnni`` to build the AVX-512 code without
the int8 dot-product instructions).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
NATIVE = ["-march=native"]


def cache_dir() -> Path:
    env = os.environ.get("ADAROUTE_EXT_DIR")
    return Path(env) if env else Path.home() / ".cache" / "adaroute" / "ext"


def _cpu_signature() -> str:
    """The CPU model and feature flags: a library built with -march=native is only valid on such a CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _arch() -> list[str]:
    arch = [] if os.environ.get("ADAROUTE_NATIVE") == "0" else NATIVE
    return arch + os.environ.get("ADAROUTE_CXXFLAGS", "").split()


def _key(files: list[Path], compiler: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(FLAGS + _arch()).encode())
    h.update(compiler.encode())
    h.update(_cpu_signature().encode())
    return h.hexdigest()[:16]


def _compile(compiler: str, sources: list[Path], target: Path) -> None:
    """Compiles into a temporary file and renames it, so concurrent first uses never see half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for arch in dict.fromkeys(((*_arch(),), ())):  # without -march=native: still a portable build
            cmd = [compiler, *FLAGS, *arch, *map(str, sources), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(name: str, sources: list[Path], headers: list[Path] = ()) -> ctypes.CDLL:
    """The library built from ``sources`` (headers only feed the cache key), built if the cache has
    none; raises on failure."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    target = cache_dir() / f"{name}-{_key([*sources, *headers], compiler)}.so"
    if not target.exists():
        _compile(compiler, sources, target)
    return ctypes.CDLL(str(target))
