"""Staged rollout in the real server process, driven by the `openai` client: a healthy routed arm stays
in canary over 200 requests, a faulty one is rolled back to dense (audited, alerted) with no failed
request, canary share and stickiness, admin API authentication, the CLI wrapper."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys

import httpx
import openai
import pytest

from tests.serve.conftest import ServerProcess, free_port, wait_rows

ADMIN = "let-me-in"


def _ask(client, user: str | None, content: str = "hello there", **kw):
    extra = {"user": user} if user else {}
    return client.chat.completions.create(model="tiny-routed", messages=[{"role": "user", "content": content}],
                                          max_tokens=6, temperature=0, **extra, **kw)


def _admin(server, method: str = "GET", key: str | None = ADMIN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, server.url + "/admin/rollout", headers=headers, timeout=30, **kw)


def _events(audit) -> list[dict]:
    db = sqlite3.connect(f"file:{audit}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM rollout_events ORDER BY seq")]
    finally:
        db.close()


@pytest.fixture(scope="module")
def canary(tiny_routed_dir, tmp_path_factory):
    """Canary at 0.5 with generous quality limits (a tiny random model agrees with itself only so much)."""
    d = tmp_path_factory.mktemp("rollout")
    gates = d / "gates.toml"
    gates.write_text("min_agreement = 0.05\nmax_kl = 50.0\nmin_samples = 20\nmax_itl_ratio = 100.0\n")  # timing-free
    s = ServerProcess(tiny_routed_dir, "--stage", "canary", "--canary-fraction", "0.5", "--shadow-fraction", "0.5",
                      "--gates", str(gates), "--admin-key", ADMIN, "--max-batch", "4", audit=d / "audit.sqlite")
    yield s
    s.stop()


def test_healthy_canary_is_shared_sticky_and_never_rolled_back(canary):
    client = canary.client()
    arms = [_ask(client, f"client-{i}").model_extra["adaroute"]["arm"] for i in range(200)]
    share = arms.count("routed") / len(arms)
    assert abs(share - 0.5) < 3 * math.sqrt(0.25 / len(arms))
    again = [_ask(client, f"client-{i}").model_extra["adaroute"]["arm"] for i in range(20)]
    assert again == arms[:20]
    status = _admin(canary).json()
    assert status["stage"] == "canary" and status["shadow"]["samples"] > 0
    assert status["arms"]["routed"]["requests"] > 0 and status["arms"]["dense"]["requests"] > 0
    assert [e["kind"] for e in _events(canary.audit)] == ["start"]  # no rollback
    rows = wait_rows(canary.audit, "stage = 'canary'", 220)
    assert len(rows) == 220 and {r["arm"] for r in rows} == {"dense", "routed"}
    assert any(r["shadow_agreement"] is not None for r in wait_rows(canary.audit, "shadow_agreement IS NOT NULL"))


def test_healthy_shadow_stage_passes_200_requests(canary):
    assert _admin(canary, "POST", json={"stage": "shadow", "reason": "shadow run"}).json()["stage"] == "shadow"
    client = canary.client()
    arms = {_ask(client, f"s-{i}", content=f"question {i}").model_extra["adaroute"]["arm"] for i in range(200)}
    status = _admin(canary).json()
    assert arms == {"dense"} and status["stage"] == "shadow"
    assert status["window"]["agreement"]["n"] >= status["gates"]["min_samples"]
    assert not status["window"]["agreement"]["breached"]
    assert _admin(canary, "POST", json={"stage": "canary"}).json()["stage"] == "canary"


def test_a_request_may_not_pick_its_arm_under_a_rollout(canary):
    with pytest.raises(openai.BadRequestError, match="the rollout chooses the arm"):
        _ask(canary.client(), "x", extra_body={"arm": "routed"})


def test_admin_api_refuses_missing_and_wrong_keys_and_bad_changes(canary):
    for key in (None, "let-me-out", "let-me-i"):
        r = _admin(canary, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _admin(canary, "POST", key="nope", json={"stage": "dense"}).status_code == 401
    bad = _admin(canary, "POST", json={"stage": "sideways"})
    assert bad.status_code == 400 and "stage" in bad.json()["error"]["message"]
    bad = _admin(canary, "POST", json={"canary_fraction": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "canary_fraction"
    assert _admin(canary).json()["stage"] == "canary"
    metrics = httpx.get(canary.url + "/metrics").text
    assert 'adaroute:requests_rejected_total{reason="unauthorized"}' in metrics


def test_the_rollout_command_reads_and_changes_the_stage(canary, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "adaroute", "rollout", *args, "--url", canary.url],
                              capture_output=True, text=True, timeout=60)

    out = tmp_path / "status.json"
    done = cli("status", "--admin-key", ADMIN, "--json", str(out))
    assert done.returncode == 0 and "stage canary" in done.stdout and json.loads(out.read_text())["stage"] == "canary"
    done = cli("set", "--admin-key", ADMIN, "--stage", "shadow", "--reason", "quieter")
    assert done.returncode == 0 and "stage shadow" in done.stdout
    assert {_ask(canary.client(), f"client-{i}").model_extra["adaroute"]["arm"] for i in range(10)} == {"dense"}
    done = cli("set", "--admin-key", "wrong", "--stage", "routed")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "401" in done.stderr
    events = wait_rows(canary.audit, "1", 1) and _events(canary.audit)
    last = events[-1]
    assert (last["kind"], last["from_stage"], last["to_stage"]) == ("set", "canary", "shadow")
    assert last["reason"] == "quieter"
    assert last["actor"].startswith("admin:key-") and ADMIN not in last["actor"]
    cli("set", "--admin-key", ADMIN, "--stage", "canary")


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_a_faulty_routed_arm_is_rolled_back_and_no_request_fails(tiny_routed_dir, tmp_path, fault):
    audit = tmp_path / "audit.sqlite"
    s = ServerProcess(tiny_routed_dir, "--stage", "routed", "--shadow-fraction", "0", "--admin-key", ADMIN,
                      "--faults", f"{fault}@1:all", audit=audit)
    try:
        client = s.client()
        answers = [_ask(client, f"c{i}") for i in range(60)]
        assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
        arms = [a.model_extra["adaroute"]["arm"] for a in answers]
        assert arms[0] == "routed" and arms[-1] == "dense"  # rolled back on the way
        status = _admin(s).json()
        assert status["stage"] == "dense"
        events = _events(audit)
        rollback = [e for e in events if e["kind"] == "rollback"]
        assert len(rollback) == 1 and rollback[0]["from_stage"] == "routed" and "failsafe_rate" in rollback[0]["reason"]
        assert json.loads(rollback[0]["window"])["failsafe_rate"]["breached"] is True
        assert arms.index("dense") <= 30  # at the first look: min_samples (30) routed requests
        metrics = httpx.get(s.url + "/metrics").text
        assert 'adaroute:alerts_total{reason="failsafe_rate"} 1.0' in metrics
        assert "adaroute:rollbacks_total 1.0" in metrics
        reason = {"raise": "error", "nan": "nonfinite"}[fault]
        assert f'adaroute:failsafe_total{{layer="0",reason="{reason}"}}' in metrics
        routed = wait_rows(audit, "arm = 'routed'", 1)
        assert routed and all(r["failsafe"] > 0 and reason in json.loads(r["failsafe_reasons"]) for r in routed)
        code, out = s.terminate()
        assert code == 0 and "rolling back routed -> dense" in out
        view = subprocess.run([sys.executable, "-m", "adaroute", "audit", str(audit), "--json",
                               str(tmp_path / "a.json")], capture_output=True, text=True, timeout=60)
        assert view.returncode == 0 and "rollout timeline:" in view.stdout and "rollback routed -> dense" in view.stdout
        stages = json.loads((tmp_path / "a.json").read_text())["rollout"]["stages"]
        assert stages["routed"]["routed"]["failsafe_events"] > 0 and stages["dense"]["dense"]["requests"] > 0
    finally:
        s.stop()


def test_no_admin_key_no_admin_api_and_cli_checks(tiny_routed_dir, tiny_dir):
    s = ServerProcess(tiny_routed_dir, "--stage", "shadow")
    try:
        assert httpx.get(s.url + "/admin/rollout").status_code == 404
    finally:
        s.stop()
    for args, message in ((["--stage", "canary", "--canary-fraction", "2"], "invalid fraction in [0, 1] value"),
                          (["--auto-promote"], "--auto-promote needs --stage"),
                          (["--stage", "shadow", "--faults", "boom@0.1"], "--faults: faults: unknown"),
                          (["--stage", "shadow", "--gates", "/nonexistent.toml"], "no such file")):
        done = subprocess.run([sys.executable, "-m", "adaroute", "serve", str(tiny_routed_dir), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "adaroute", "serve", str(tiny_dir), "--stage", "shadow",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "a rollout needs a routed model" in done.stderr
