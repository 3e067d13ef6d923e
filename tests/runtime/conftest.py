"""Tiny models for runtime tests (hidden 64, 2 layers, random weights)."""

import pytest

from tests.fixtures import make_tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(seed=3)


@pytest.fixture(params=["reference", "cpu"])
def kernel_name(request):
    return request.param
