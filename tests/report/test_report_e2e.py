"""`adaroute report` end to end on a tiny routed model: every section, report.json keys, valid PNGs,
a page that opens from disk, the traffic section from a real audit log, and one-line errors."""

import json
import time
from pydoc_data.topics import topics

import pytest
from PIL import Image

from adaroute.cli import main

SECTIONS = ("kpis", "curve", "cost", "groups", "imbalance", "explain", "traffic")
FIGURES = ("curve", "speed", "cost", "groups", "usage", "token_density", "union", "explain", "traffic",
           "density_by_arm")


def write_audit(path):
    """Rows through the server's own audit writer: two arms, two minutes apart, fail-safe events on the
    routed arm and a rollback."""
    from adaroute.serve.audit import AuditLog, AuditRow, layer_json, summary_json
    from adaroute.serve.rollout import RolloutEvent

    log, now = AuditLog(path), time.time()
    for i in range(6):
        arm = "routed" if i % 2 else "dense"
        log.write(AuditRow(id=f"r{i}", created=now + 60 * (i // 3), endpoint="/v1/completions", arm=arm, model="m",
                           base_model="b", routed_hash=None, format_version=1, prompt_sha256="0" * 64, prompt=None,
                           prompt_tokens=5, completion_tokens=8, ttft_s=0.01, latency_s=0.1,
                           finish_reason="length", mean_density=0.5 if arm == "routed" else 1.0,
                           layer_density=layer_json([0.5, 0.5]), units_per_token=summary_json({"mean": 64.0}),
                           key_id=None, failsafe=4 if i == 1 else 0))
    log.write_event(RolloutEvent(now + 90, "gates", "rollback", "canary", "dense", "agreement below 0.8"))
    log.close()


@pytest.fixture(scope="module")
def report(tiny_routed, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data, group = root / "data.txt", root / "group.txt"
    data.write_text(topics["lambda"] + topics["while"])
    group.write_text(topics["class"])
    write_audit(root / "audit.db")
    code = main(["report", str(tiny_routed), "--data", str(data), "--group", f"classes={group}",
                 "--audit", str(root / "audit.db"), "--explain", "for x in range(3): print(x)", "--watts", "200",
                 "--max-tokens", "512", "--group-tokens", "1024", "--curve-tokens", "256", "-o", str(root / "out")])
    assert code == 0
    return root / "out", json.loads((root / "out" / "report.json").read_text())


def test_every_section_is_in_the_json(report):
    _, r = report
    assert set(SECTIONS) <= set(r)
    k = r["kpis"]
    for key in ("perplexity_ratio", "top1_agreement", "mean_density", "ffn_bytes_share", "ffn_flops_share",
                "units_per_token", "peak_rss_mb"):
        assert k[key] is not None, key
    assert [s["batch"] for s in k["speed"]] == [1, 4] and all(s["dense"] > 0 and s["routed"] > 0 for s in k["speed"])
    assert [p["density"] for p in r["curve"]["points"]] == [1.0, 0.7, 0.5, 0.4, 0.3]
    assert all(p["oracle"] for p in r["curve"]["points"])  # calibration text is available: oracle measured
    assert [s["batch"] for s in r["cost"]["scenarios"]] == [1, 4]
    assert r["cost"]["scenarios"][0]["routed"]["kwh_per_million_tokens"] > 0
    assert {i["name"] for i in r["cost"]["inputs"]} >= {"price_per_hour", "conversion_seconds", "watts"}


def test_groups_include_user_and_builtin_groups_with_intervals(report):
    _, r = report
    names = [g["group"] for g in r["groups"]["groups"]]
    assert names[0] == "classes" and sum(n.startswith("builtin:") for n in names) >= 3
    for g in r["groups"]["groups"]:
        assert g["windows"] >= 3 and g["interval"]["perplexity_ratio"] is not None


def test_imbalance_and_explain(report):
    _, r = report
    m = r["imbalance"]
    assert len(m["layers"]) == 2 and m["union"]["batch"] == list(range(1, 9))
    assert m["union"]["measured"] == sorted(m["union"]["measured"])  # the union only grows
    assert m["bytes_per_token"]["p99"] <= m["bytes_per_token"]["dense"]
    e = r["explain"]
    assert len(e["counts"]) == len(e["tokens"]) and len(e["counts"][0]) == 2
    assert e["chosen"]["index"] == e["most"][0]["index"] and not e["default_text"]


def test_traffic_from_the_audit_log(report):
    _, r = report
    t = r["traffic"]
    assert t["summary"]["requests"] == 6
    assert t["per_arm_over_time"]["dense"]["minute"] == [0, 1]
    assert t["density_by_arm"]["routed"] == [0.5] * 3
    assert t["failsafe_by_arm"]["routed"] == {"events": 4, "requests": 1}
    assert t["per_arm_over_time"]["routed"]["failsafe"] == [4, 0]
    [event] = t["rollout_events"]
    assert (event["kind"], event["from_stage"], event["to_stage"]) == ("rollback", "canary", "dense")


def test_figures_are_valid_pngs_and_the_page_uses_only_local_files(report):
    out, r = report
    assert set(r["figures"]) == set(FIGURES)
    page = (out / "index.html").read_text()
    for name in r["figures"].values():
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"src='{name}'" in page
    for key in SECTIONS:
        assert f"id={key}>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_errors_are_one_line(tiny_routed, tmp_path, capsys):
    assert main(["report", str(tiny_routed), "--group", "nofile", "-o", str(tmp_path / "a")]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "b")]) == 2
    assert "not a routed model directory" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert main(["report", str(tiny_routed), "-o", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["report", str(tiny_routed), "--price-per-hour", "0", "-o", str(tmp_path / "c")]) == 2
    assert main(["report", str(tiny_routed), "--audit", str(tmp_path / "none.db"), "-o", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "c").exists() and (tmp_path / "busy" / "keep.txt").exists()
