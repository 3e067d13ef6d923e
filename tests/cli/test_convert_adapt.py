import json

import pytest
import torch

from adaroute.cli import main
from adaroute.routing import load_routed, routed_modules
from adaroute.routing.quality import dense_policies
from tests.fixtures import make_tiny_llama, write_hf_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(write_hf_dir(tmp_path_factory.mktemp("tiny") / "m", seed=0))


@pytest.mark.parametrize("argv, message", [
    (["--no-adapt", "--adapt-rank", "4"], "contradict"),
    (["--preset", "quick", "--adapt-rank", "4"], "has no distillation stage"),
])
def test_contradictory_adapter_options_are_one_line_errors(argv, message, tiny_dir, tmp_path, capsys):
    assert main(["convert", tiny_dir, "-o", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("adaroute: error: ") and message in err[-1]


def test_default_preset_prints_its_budget_and_writes_adapters(tiny_dir, tmp_path, capsys, monkeypatch):
    # The default preset at a size a unit test affords: few steps, short windows.
    from adaroute.config import _TRAIN_PRESETS

    small = dict(_TRAIN_PRESETS["default"], calib_tokens=512, window=64, sensitivity_tokens=128, distill_steps=2,
                 distill_window=32, distill_tokens=256)
    monkeypatch.setitem(_TRAIN_PRESETS, "default", small)
    out = tmp_path / "routed"
    assert main(["convert", tiny_dir, "--calib", "builtin:calib", "--density", "0.5", "-o", str(out),
                 "--adapt-rank", "3"]) == 0
    printed = capsys.readouterr().out
    assert "preset default:" in printed and "budget 30 min" in printed and "rank-3 adapters" in printed
    assert "(distilled at density 0.25)" in printed  # the default preset at the 0.5 target
    meta = json.loads((out / "config.json").read_text())["adaroute"]
    assert {e["adapter_rank"] for e in meta["layers"]} <= {0, 3} and any(e["adapter_rank"] for e in meta["layers"])
    assert not (tmp_path / "routed.distill-checkpoint.pt").exists()  # removed once the directory is written
    model, _ = load_routed(out)
    ids = torch.arange(2, 40)[None]
    with torch.no_grad(), dense_policies(routed_modules(model)):
        assert torch.equal(model(ids).logits, make_tiny_llama(0)(ids).logits)  # dense path == the original
