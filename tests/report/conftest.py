"""A tiny routed model directory (converted for real, quick settings), shared by the report tests."""

import pytest

from tests.fixtures import convert_tiny


@pytest.fixture(scope="session")
def tiny_routed(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("report-model"))[1]
