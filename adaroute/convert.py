"""dense model -> routed model directory, in one call.

    result = adaroute.convert("smollm2-135m", ["builtin:calib"], density=0.5, output="out/routed")
    result = adaroute.convert(..., preset="quick", weights="q4")    # the directory stores q4_1 blocks
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaroute.config import RoutingConfig, TrainConfig
from adaroute.fsio import check_output_dir
from adaroute.routing.storage import save_routed
from adaroute.routing.surgery import route_model
from adaroute.training.trainer import TrainReport, train_routers


@dataclass
class ConvertResult:
    model: nn.Module  # routed, eval mode
    tokenizer: object
    report: TrainReport
    calibration: dict[str, Any]  # what calibration.json holds
    directory: Path | None


def convert(
    model: str | nn.Module,
    calib: list[str] | str,
    density: float = 0.5,
    output: str | Path | None = None,
    preset: str = "default",
    routing: RoutingConfig | None = None,
    train: TrainConfig | None = None,
    tokenizer=None,
    base_model: str | None = None,
    force: bool = False,
    weights: str = "f32",
) -> ConvertResult:
    """Convert a dense model into a routed one at mean FFN ``density``.

    model:      a model spec (HF dir, .gguf, alias) or an already loaded model (then pass ``tokenizer``).
    calib:      calibration data specs (UTF-8 files or ``builtin:calib``).
    routing / train: full configs; when omitted, ``RoutingConfig(density=density)`` and the named preset.
    output:     directory to write (model.safetensors, config.json, tokenizer, calibration.json).
    weights:    the format the routed model runs at (``adaroute.runtime.formats``: f32, q8, q4, q4_0),
                recorded in config.json; at q8/q4 the directory stores that format's blocks
                (``adaroute.runtime.checkpoint``) and runs only at it.
    """
    from adaroute.data import load_texts
    from adaroute.models import load_model
    from adaroute.runtime.formats import parse_format

    routing = routing or RoutingConfig(density=density)
    train = train or TrainConfig.from_name(preset)
    weights = parse_format(weights)
    if weights != "f32" and routing.head_rows:  # a block head stays exact (runtime.head)
        routing = dataclasses.replace(routing, head_rows=0)
    specs = [calib] if isinstance(calib, str) else list(calib)
    if output is not None:
        check_convert_output(output, model if isinstance(model, str) else None, specs, force)
    if isinstance(model, str):
        base_model = base_model or model
        model, tokenizer = load_model(model)
    if tokenizer is None:
        raise ValueError("tokenizer: pass the tokenizer together with an already loaded model")
    texts = [t.text for t in load_texts(specs)]

    start = time.perf_counter()
    model.eval()
    mods = route_model(model, group_size=routing.group_size)
    model.adaroute_head_rows = routing.head_rows  # the runtime's output head (as a loaded directory says)
    # An interrupted distillation resumes from here on the next identical run (removed once saved).
    checkpoint = Path(f"{output}.distill-checkpoint.pt") if output is not None and train.distill_steps else None
    report = train_routers(model, tokenizer, texts, mods, routing, train, checkpoint)
    calibration = {
        "data": specs,
        "seed": train.seed,
        "preset": train.name,
        "train": train.to_dict(),
        "routing": routing.to_dict(),
        "weights": weights,
        "torch_version": torch.__version__,
        **report.to_dict(),  # includes "seconds" per stage
        "total_seconds": time.perf_counter() - start,
    }
    directory = None
    if output is not None:
        directory = save_routed(model, tokenizer, output, base_model or "unknown", routing, calibration,
                                replace=force, weights=weights)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    return ConvertResult(model, tokenizer, report, calibration, directory)


def check_convert_output(output: str | Path, model_spec: str | None, calib: list[str], force: bool = False) -> Path:
    """Refuse an output that would overwrite or mix with the model or data it is made from (no model needed)."""
    from adaroute.data import BUILTIN_PREFIX
    from adaroute.models import resolve

    inputs = [Path(c) for c in calib if not c.startswith(BUILTIN_PREFIX)]
    protected = []
    if model_spec is not None:
        source = resolve(model_spec)
        if source.gguf_file:  # a folder beside the file is fine; the file itself is an input
            inputs.append(source.directory / source.gguf_file)
        else:  # nothing may be written inside a model directory
            inputs.append(source.directory)
            protected.append(source.directory)
    return check_output_dir(output, inputs=inputs, protected=protected, force=force)
