"""The demo end to end on a tiny model: every stage runs and the numbers it prints are consistent."""

import json

import pytest

from adaroute.cli import main
from tests.fixtures import write_hf_dir


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    write_hf_dir(tmp_path / "tiny")
    out = tmp_path / "demo.json"
    assert main(["demo", "--model", str(tmp_path / "tiny"), "--max-tokens", "256", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity ratio" in printed and "decode tokens/s" in printed and "ideal from weight bytes" in printed
    result = json.loads(out.read_text())
    q, speed = result["quality"], result["speed"]
    assert q["perplexity_ratio"] == pytest.approx(q["perplexity_routed"] / q["perplexity_dense"], rel=1e-3)
    assert 0 < q["mean_density"] < 1
    assert set(speed) == {"transformers-eager", "adaroute-dense", "adaroute-routed"}
    routed = speed["adaroute-routed"]
    assert routed["ideal_vs_dense"] > 1 and routed["vs_dense"] > 0 and 0 < routed["density"] < 1
    assert result["answers"]["dense"] is not None
