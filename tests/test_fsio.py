"""Outputs are written whole or not at all, and replaced whole, never mixed."""

import json
import os
import subprocess
import sys

import pytest

from adaroute.errors import AdarouteError
from adaroute.fsio import atomic_dir, check_output_dir, write_json_atomic


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old-only.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["old-only.txt"]
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # nothing of the old one mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind


def test_atomic_dir_refuses_to_mix_without_replace(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "x").write_text("x")
    with pytest.raises(AdarouteError, match="not empty"):
        with atomic_dir(target) as tmp:
            (tmp / "y").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["x"]


def test_json_is_written_whole(tmp_path):
    out = tmp_path / "deep" / "r.json"
    write_json_atomic(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_force_replaces_only_routed_directories(tmp_path):
    routed = tmp_path / "r"
    routed.mkdir()
    (routed / "config.json").write_text(json.dumps({"adaroute": {}}))
    assert check_output_dir(routed, force=True) == routed.absolute()
    with pytest.raises(AdarouteError, match="not empty"):
        check_output_dir(routed)
    home_like = tmp_path / "home"
    home_like.mkdir()
    (home_like / "notes.txt").write_text("keep me")
    with pytest.raises(AdarouteError, match="not a routed model"):
        check_output_dir(home_like, force=True)


def test_output_may_not_contain_or_sit_inside_an_input(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    for out in (model, model / "sub", tmp_path):
        with pytest.raises(AdarouteError, match="would overwrite the input"):
            check_output_dir(out, inputs=[model])
    assert check_output_dir(tmp_path / "beside", inputs=[model]) == (tmp_path / "beside").absolute()


def test_import_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("import os, adaroute, adaroute.models, adaroute.cli, adaroute.routing; "
            "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None None"


def test_loading_restores_the_environment(tmp_path, monkeypatch):
    from adaroute import load_model
    from tests.fixtures import write_hf_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    load_model(str(write_hf_dir(tmp_path / "m")))
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_cli_parser_does_not_import_torch():
    """Argument errors answer before torch loads (about a second and a half on these machines)."""
    code = ("import sys, adaroute.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
