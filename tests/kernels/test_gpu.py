"""GPU path against the reference. Skipped without a CUDA device.

With Triton installed, ``TRITON_INTERPRET=1 pytest -m gpu tests/kernels/test_gpu.py`` runs the
Triton kernels through Triton's CPU interpreter instead (slow, but checks the kernels anywhere).
"""

import math
import os

import pytest
import torch

from adaroute.kernels import get_kernel, reference
from tests.kernels.test_kernels import F, H, gap_threshold, routed_tensors

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRET, reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu():
    kernel = get_kernel("triton")
    if not kernel.has_triton():
        pytest.skip("triton is not installed")
    return kernel


def on_device(tensors: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in tensors.items()}


@pytest.mark.parametrize("tokens", [1, 3])
def test_router_scores_match_reference(gpu, tokens):
    t = routed_tensors(seed=tokens)
    x = torch.randn(tokens, H)
    ref = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    d = on_device(t)
    got = gpu.router_scores(x.to(DEVICE), d["shadow_q"], d["shadow_scale"], d["unit_bias"]).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("min_units", "max_units"), [(0, F), (10, 50)])
def test_routed_ffn_matches_reference(gpu, tokens, density, min_units, max_units):
    t = routed_tensors(seed=10 + tokens)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    thr = {0.0: math.inf, 1.0: -math.inf}.get(density) or gap_threshold(scores, density)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=min_units, max_units=max_units)
    y, n = gpu.routed_ffn(x.to(DEVICE), **on_device(t), threshold=thr, min_units=min_units, max_units=max_units)
    assert n.cpu().tolist() == n_ref.tolist()
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-5)


def test_residual_is_accumulated_in_place(gpu):
    t = routed_tensors(seed=4)
    x, res = torch.randn(2, H), torch.randn(2, H)
    expect = res + reference.routed_ffn(x, **t, threshold=-0.5, min_units=0, max_units=F)[0]
    res_d = res.to(DEVICE)
    out, _ = gpu.routed_ffn(x.to(DEVICE), **on_device(t), threshold=-0.5, min_units=0, max_units=F, residual=res_d)
    assert out.data_ptr() == res_d.data_ptr()
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the runtime test needs a CUDA GPU")
def test_runtime_on_gpu_matches_transformers_and_cpu():
    from adaroute.routing import route_model
    from adaroute.runtime import Engine, ExecutionPolicy, generate
    from tests.fixtures import make_tiny_llama

    model = make_tiny_llama(seed=3).cuda()
    prompt = [5, 9, 13, 2, 77]
    ids = torch.tensor([prompt], device="cuda")
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                        do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(Engine.from_model(model), [prompt], 32).tokens[0] == hf
    for m in route_model(model):
        m.threshold, m.min_units, m.max_units = -6.0, 8, 100
    seq = torch.tensor([[3, 1, 4, 1, 5, 9]])
    logits = {}
    for device in ("cuda", "cpu"):
        engine = Engine.from_model(model.to(device), policy=ExecutionPolicy.always_sparse())
        cache = engine.new_cache(1, 8)
        logits[device] = torch.stack([engine.forward(seq[:, i:i + 1], cache)[0].cpu() for i in range(6)])
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)


def test_routed_ffn_on_unit_packed_weights(gpu):
    from tests.kernels.test_kernels import packed

    t = packed(routed_tensors(seed=21))
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(2))
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    thr = gap_threshold(scores, 0.4)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=F)
    w_units = t["w_gate"].as_strided((F, 3, H), (3 * H, H, 1)).to(DEVICE)  # the same [F, 3, H] store
    d = {**on_device({k: v for k, v in t.items() if not k.startswith("w_")}),
         **dict(zip(("w_gate", "w_up", "w_down_t"), reference.unit_views(w_units), strict=True))}
    y, n = gpu.routed_ffn(x.to(DEVICE), **d, threshold=thr, min_units=0, max_units=F)
    assert n.cpu().tolist() == n_ref.tolist()
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-5)
