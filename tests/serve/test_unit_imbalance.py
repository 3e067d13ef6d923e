"""``adaroute:layer_unit_imbalance{layer}``: max over mean unit use per layer of the routed arm, over
the sliding window of ``adaroute:layer_density``, read from the routed engine's unit-usage counter."""

from __future__ import annotations

import torch
from starlette.testclient import TestClient

from adaroute.config import ServeConfig
from adaroute.models import load_model
from adaroute.routing.stats import use_imbalance
from adaroute.serve.app import create_app
from adaroute.serve.metrics import WINDOW_EVERY, WINDOW_STEPS, ServeMetrics
from adaroute.serve.model import ServedModel
from adaroute.serve.service import Service

GAUGE = "adaroute:layer_unit_imbalance"


def gauge_values(metrics_text: str) -> dict[str, float]:
    """layer -> value of the imbalance gauge in a /metrics page."""
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith(GAUGE + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('layer="')[1].split('"')[0]] = float(value)
    return out


def test_served_routed_model_exposes_the_engines_imbalance(tiny_routed_dir):
    model, tokenizer = load_model(str(tiny_routed_dir))
    served = ServedModel(model, tokenizer, "tiny", source=tiny_routed_dir)
    service = Service(served, ServeConfig(max_batch=2))
    usage = served.engines["routed"].unit_usage
    assert usage is not None and served.engines["dense"].unit_usage is None
    tokens = 2 * WINDOW_EVERY + 1  # the first token comes from the prefill: 32 decode steps, two updates
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": tokens, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "for loops"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens
        page = client.get("/metrics").text
    steps = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                if line.startswith("adaroute:decode_steps_total{"))
    assert steps == 2 * WINDOW_EVERY  # so the last update saw every step the counter holds
    values = gauge_values(page)
    expect = use_imbalance(usage)  # [L]: the window holds every step so far
    assert set(values) == {"0", "1"} and all(v >= 1.0 for v in values.values())
    assert int(usage.sum()) > 0
    for layer, value in values.items():
        assert abs(value - float(expect[int(layer)])) < 1e-9


def test_window_slides_over_the_last_steps_and_skips_layers_without_selections():
    """Driven step by step: the gauge after 300 steps is the imbalance of steps 33..288 (the update
    at step 288 covers the last WINDOW_STEPS), and a layer that selected nothing has no value."""
    units = 8
    counter = torch.zeros(2, units, dtype=torch.int64)
    metrics = ServeMetrics(units, 2, max_queue=1, usage=counter)
    g = torch.Generator().manual_seed(0)
    added = []
    for _ in range(300):
        step = torch.zeros(2, units, dtype=torch.int64)
        step[0] = torch.randint(0, 3, (units,), generator=g)  # layer 1 ran dense: nothing counted
        counter += step
        added.append(step)
        metrics.on_step("routed", torch.tensor([[int(step[0].sum())], [-1]]))
    last = 300 // WINDOW_EVERY * WINDOW_EVERY
    window = torch.stack(added[last - WINDOW_STEPS:last]).sum(0)  # [L, F]
    value = metrics.registry.get_sample_value(GAUGE, {"layer": "0"})
    assert value == float(use_imbalance(window)[0]) and value >= 1.0
    assert value != float(use_imbalance(counter)[0])  # not the whole history
    assert metrics.registry.get_sample_value(GAUGE, {"layer": "1"}) is None
    metrics.on_step("dense", torch.full((2, 1), -1))  # the dense arm's steps do not move the window
    assert metrics.registry.get_sample_value(GAUGE, {"layer": "0"}) == value
