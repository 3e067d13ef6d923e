"""Alert rules and the Grafana dashboard: promtool validates and unit-tests the rules, every PromQL
query of the dashboard parses, and both use only the metric names the server exposes."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "adaroute.json"
RULE_NAMES = {"AdarouteFailsafeRateHigh", "AdarouteShadowAgreementLow", "AdarouteDensityDrift",
              "AdarouteRoutedSlowerThanDense", "AdarouteRollback", "AdarouteQueueSaturated",
              "AdarouteQueueFullRejections"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (make test installs it)")
    return path


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    out = run("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(RULE_NAMES)} rules found" in out.stdout


def test_promtool_test_rules_fire_and_stay_silent():
    out = run("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    for name in RULE_NAMES:  # each rule: one evaluation that fires and one that stays silent
        cases = [c for t in tests for c in t["alert_rule_test"] if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases), name


def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.yml"
    text = RULES.read_text()
    assert "rate(adaroute:failsafe_total[5m]))" in text
    broken.write_text(text.replace("rate(adaroute:failsafe_total[5m]))", "rate(adaroute:failsafe_total[5m])", 1))
    assert run("check", "rules", str(broken)).returncode != 0


def test_every_dashboard_query_parses(tmp_path):
    """promtool checks each query as a recording rule ($instance and $__ variables filled in)."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e.replace("$instance", ".*")} for i, e in enumerate(exprs)]}]}
    file = tmp_path / "dashboard_rules.yml"
    file.write_text(yaml.safe_dump(rules))
    out = run("check", "rules", str(file))
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_and_dashboard_use_only_the_servers_metric_names():
    known = server_metric_names()
    used_rules = metric_names(RULES.read_text())
    used_dash = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used_rules - known == set() and used_dash - known == set()
    # the dashboard shows every metric the server exposes
    assert {n for n in known if not n.endswith("_info")} - used_dash == set()


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p["targets"]]


def metric_names(text: str) -> set[str]:
    """adaroute:* names with a histogram's _bucket/_sum/_count suffix removed."""
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"adaroute:[a-z0-9_]+", text)}


def server_metric_names() -> set[str]:
    """What the server's registry exposes (request and rollout metrics): counters with _total."""
    from adaroute.serve.metrics import ServeMetrics
    from adaroute.serve.rollout_metrics import RolloutMetrics

    metrics = ServeMetrics(units=8, layers=2, max_queue=4)
    RolloutMetrics(metrics.registry, failsafes=[], calibrated_density=0.5)
    return {f.name + "_total" if f.type == "counter" else f.name for f in metrics.registry.collect()}
