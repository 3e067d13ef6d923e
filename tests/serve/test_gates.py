"""Gate decisions and the rollout controller without a server: windows, bounds, rollback, promotion,
sticky canary hashing, gate files, and audit logs from before the rollout columns existed."""

from __future__ import annotations

import math
import random
import sqlite3

import pytest

from adaroute.serve.audit import AuditLog, connect, summarize
from adaroute.serve.errors import APIError
from adaroute.serve.gates import GateConfig, Gates, Window
from adaroute.serve.rollout import RequestOutcome, Rollout, bucket
from adaroute.serve.shadow import ShadowResult

GATES = GateConfig(min_agreement=0.8, max_kl=0.3, max_failsafe_rate=0.05, min_samples=30, window=200,
                   promote_after=60)


def _shadow(agreement: float, kl: float = 0.05, failsafe: int = 0) -> ShadowResult:
    return ShadowResult("r", "dense", 32, agreement, kl, failsafe, 32 * 30)


def test_window_mean_and_std_slide():
    w = Window(3)
    for v in (1.0, 2.0, 3.0, 10.0):
        w.add(v)
    assert w.n == 3 and w.mean == pytest.approx(5.0) and w.std == pytest.approx(math.sqrt(19.0))


@pytest.mark.parametrize("seed", range(20))
def test_healthy_arm_is_never_rolled_back(seed):
    """Agreement ~ 0.90 +- 0.06 per request against a minimum of 0.80: 200 looks, no breach."""
    rng = random.Random(seed)
    r = Rollout("shadow", GATES)
    for _ in range(200):
        r.on_shadow(_shadow(min(1.0, rng.gauss(0.90, 0.06)), abs(rng.gauss(0.05, 0.03))))
    assert r.stage == "shadow"


@pytest.mark.parametrize("seed", range(20))
def test_degraded_arm_is_rolled_back_within_the_window(seed):
    rng = random.Random(seed)
    alerts = []
    r = Rollout("canary", GATES, on_alert=alerts.append)
    for _ in range(GATES.window):  # rolled back within the window
        r.on_shadow(_shadow(min(1.0, rng.gauss(0.60, 0.12))))
        if r.stage == "dense":
            break
    assert r.stage == "dense" and alerts == ["agreement"]
    event = r.events[-1]
    assert event.kind == "rollback" and event.from_stage == "canary" and "agreement breached" in event.reason
    assert event.window["agreement"]["breached"] is True


def test_a_handful_of_bad_requests_neither_trigger_nor_linger():
    r = Rollout("shadow", GATES)
    for i in range(100):
        r.on_shadow(_shadow(0.2 if i % 25 == 0 else 0.9))
    assert r.stage == "shadow"


def test_failsafe_and_latency_gates_use_routed_requests():
    r = Rollout("canary", GATES)
    for _ in range(40):
        r.on_request(RequestOutcome("dense", 32, 1.0, 0.1, 1.0, 0, 0))
    for _ in range(40):  # 20 % of layer-token slots computed densely: far over 5 %
        r.on_request(RequestOutcome("routed", 32, 0.8, 0.1, 0.5, 6 * 31, 30))
        if r.stage == "dense":
            break
    assert r.stage == "dense" and "failsafe_rate" in r.events[-1].reason
    slow = Rollout("canary", GATES)
    for _ in range(40):
        slow.on_request(RequestOutcome("dense", 32, 1.0, 0.1, 1.0, 0, 0))
    for _ in range(60):  # routed ITL twice dense's
        slow.on_request(RequestOutcome("routed", 32, 1.9 + random.Random(1).random() * 0.1, 0.1, 0.5, 0, 30))
    assert slow.stage == "dense" and "itl_ratio" in slow.events[-1].reason


def test_auto_promote_walks_to_routed_after_passing_samples():
    r = Rollout("shadow", GATES, auto_promote=True)
    rng = random.Random(0)
    for _ in range(GATES.promote_after):
        r.on_shadow(_shadow(min(1.0, rng.gauss(0.95, 0.02)), 0.02))
    assert r.stage == "canary" and r.events[-1].kind == "promote"
    for _ in range(40):
        r.on_request(RequestOutcome("dense", 32, 1.0, 0.1, 1.0, 0, 0))
    for _ in range(GATES.promote_after):
        r.on_request(RequestOutcome("routed", 32, 0.8 + rng.random() * 0.02, 0.1, 0.5, 0, 30))
        r.on_shadow(_shadow(min(1.0, rng.gauss(0.95, 0.02)), 0.02))
    assert r.stage == "routed"


def test_canary_is_sticky_per_client_and_binomially_shared():
    r = Rollout("canary", GATES, canary_fraction=0.3, seed=7)
    arms = [r.choose_arm(f"user-{i}") for i in range(2000)]
    share = arms.count("routed") / len(arms)
    assert abs(share - 0.3) < 3 * math.sqrt(0.3 * 0.7 / len(arms))
    assert [r.choose_arm(f"user-{i}") for i in range(2000)] == arms  # the same client, the same arm
    assert bucket("a") == bucket("a") != bucket("b")


def test_stages_and_fractions_are_checked():
    r = Rollout("dense", GATES)
    with pytest.raises(APIError, match="stage"):
        r.set("admin", stage="half")
    with pytest.raises(APIError, match="canary_fraction"):
        r.set("admin", canary_fraction=1.5)
    assert r.stage == "dense" and r.canary_fraction == 0.1
    assert {r.choose_arm(None) for _ in range(50)} == {"dense"}


def test_gate_file_overrides_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "gates.toml"
    good.write_text("min_agreement = 0.7\nmin_samples = 20\n")
    g = GateConfig.from_calibration(0.9, 0.05).updated(good)
    assert (g.min_agreement, g.min_samples, g.max_kl) == (0.7, 20, 0.25)
    bad = tmp_path / "bad.toml"
    bad.write_text("min_agreemnt = 0.7\n")
    with pytest.raises(ValueError, match="min_agreemnt: unknown"):
        g.updated(bad)
    bad.write_text('max_kl = "high"\n')
    with pytest.raises(ValueError, match="max_kl: must be a number"):
        g.updated(bad)
    with pytest.raises(ValueError, match="min_samples"):
        GateConfig(min_samples=1)
    assert Gates(g).verdict("kl").breached is False


OLD_SCHEMA = ("CREATE TABLE requests (id TEXT, created REAL, endpoint TEXT, arm TEXT, model TEXT, base_model TEXT, "
              "routed_hash TEXT, format_version INTEGER, prompt_sha256 TEXT, prompt TEXT, prompt_tokens INTEGER, "
              "completion_tokens INTEGER, ttft_s REAL, latency_s REAL, finish_reason TEXT, mean_density REAL, "
              "layer_density TEXT, units_per_token TEXT, key_id TEXT, PRIMARY KEY (id))")


def test_an_audit_log_from_before_the_rollout_still_opens(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(OLD_SCHEMA)
    db.execute("INSERT INTO requests VALUES ('a', 1.0, 'chat', 'dense', 'm', 'm', NULL, NULL, 'h', NULL, 3, 4, 0.1, "
               "0.5, 'length', 1.0, '[1.0]', '{}', NULL)")
    db.commit()
    db.close()
    assert summarize(path)["arms"]["dense"]["requests"] == 1  # read-only, as it is
    log = AuditLog(path)  # a server opens it: the new columns and the events table appear
    log.update_shadow("a", 0.9, 0.1)
    log.close()
    db = connect(path)
    row = db.execute("SELECT stage, failsafe, shadow_agreement, shadow_kl FROM requests").fetchone()
    assert row == (None, None, 0.9, 0.1)
    assert db.execute("SELECT COUNT(*) FROM rollout_events").fetchone() == (0,)
