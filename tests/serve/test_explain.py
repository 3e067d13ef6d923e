"""Per-request explain (``"adaroute": {"explain": true}``): the units each layer computed, per decode step."""

import httpx
import pytest

from tests.serve.conftest import ServerProcess

F = 128  # FFN units of the tiny model


@pytest.fixture(scope="module")
def server(tiny_routed_dir):
    s = ServerProcess(tiny_routed_dir)
    yield s
    s.stop()


def post(server, **body):
    return httpx.post(server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny-routed", "prompt": "def f(x):", "max_tokens": 6, **body})


def test_explain_lists_units_per_step_and_layer(server):
    r = post(server, arm="routed", adaroute={"explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    explain = body["adaroute"]["explain"]
    assert explain["units_of"] == F
    steps = explain["steps"]
    assert len(steps) == body["usage"]["completion_tokens"] - 1  # the first token comes from the prefill
    assert all(len(s["units"]) == 2 and all(0 < u <= F for u in s["units"]) for s in steps)
    assert any(u < F for s in steps for u in s["units"])  # the routed arm skipped units
    # the request's density is the mean of these counts
    mean = sum(u for s in steps for u in s["units"]) / (2 * len(steps) * F)
    assert body["adaroute"]["ffn_density"] == pytest.approx(mean, abs=1e-4)
    assert isinstance(steps[0]["token"], str)


def test_dense_arm_computes_every_unit(server):
    steps = post(server, arm="dense", adaroute={"explain": True}).json()["adaroute"]["explain"]["steps"]
    assert steps and all(s["units"] == [F, F] for s in steps)


def test_explain_is_opt_in_and_validated(server):
    assert "explain" not in post(server).json()["adaroute"]
    assert "explain" not in post(server, adaroute={"explain": False}).json()["adaroute"]
    bad = post(server, adaroute={"explain": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "adaroute.explain"
    unknown = post(server, adaroute={"trace": True})
    assert unknown.status_code == 400 and "trace" in unknown.json()["error"]["param"]
