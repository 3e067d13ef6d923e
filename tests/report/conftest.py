"""A tiny routed model directory (converted for real, quick settings), shared by the report tests."""

from pydoc_data.topics import topics

import pytest

from adaroute.config import RoutingConfig, TrainConfig
from tests.fixtures import write_hf_dir

TRAIN = TrainConfig(calib_tokens=1024, window=64, ranking_steps=5, ranking_batch=256, sensitivity_tokens=256)


@pytest.fixture(scope="session")
def tiny_routed(tmp_path_factory):
    from adaroute.convert import convert

    root = tmp_path_factory.mktemp("report-model")
    write_hf_dir(root / "dense")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(topics[k] for k in ("class", "assignment", "import")))
    convert(str(root / "dense"), [str(calib)], output=root / "routed", train=TRAIN,
            routing=RoutingConfig(density=0.5, layer_min_density=0.2))
    return root / "routed"
