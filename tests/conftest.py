"""Shared fixtures: the embedded model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded default model, loaded once (integration tests)."""
    from adaroute import load_model

    torch.set_num_threads(2)
    return load_model("smollm2-135m")
