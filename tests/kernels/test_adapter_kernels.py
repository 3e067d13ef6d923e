"""The CPU routed kernel with a routing adapter against the reference, on random inputs."""

import math

import pytest
import torch

from adaroute.kernels import get_kernel, reference
from tests.kernels.test_kernels import F, H, gap_threshold, packed, routed_tensors


@pytest.fixture(scope="module")
def cpu():
    kernel = get_kernel("cpu")
    assert kernel.uses_native(), "the CPU kernel library did not build"
    return kernel


def adapter(seed: int, rank: int, f: int = F, h: int = H) -> reference.Adapter:
    g = torch.Generator().manual_seed(seed)
    return reference.Adapter(torch.randn(2 * rank, h, generator=g) / math.sqrt(h),
                             torch.randn(f, 3, rank, generator=g) * 0.3,
                             torch.randn(h, rank, generator=g) * 0.3)


def check(cpu, x, t, a, thr, min_units=0, max_units=F, residual=None):
    res_ref = None if residual is None else residual.clone()
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=min_units, max_units=max_units,
                                        residual=res_ref, adapter=a)
    y, n = cpu.routed_ffn(x, **t, threshold=thr, min_units=min_units, max_units=max_units, residual=residual,
                          adapter=a)
    assert n.tolist() == n_ref.tolist()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    return y


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("density", [0.1, 0.35, 0.7])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_adapted_routed_ffn_matches_reference(cpu, tokens, density, rank):
    t = routed_tensors(seed=tokens)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(40 + tokens))
    thr = gap_threshold(reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"]), density)
    y = check(cpu, x, t, adapter(rank, rank), thr)
    plain, _ = reference.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=F)
    assert not torch.allclose(y, plain)  # the adapter did something


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize(("min_units", "max_units"), [(25, F), (80, F), (0, 50), (0, 10), (45, 45)])
def test_adapter_with_guard_corrections_matches_reference(cpu, tokens, min_units, max_units):
    """Guards that add or drop units after the first pass: the adapter's down part is corrected too."""
    t = routed_tensors(seed=30 + tokens)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(31))
    thr = gap_threshold(reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"]), 0.4)
    check(cpu, x, t, adapter(5, 8), thr, min_units, max_units)


@pytest.mark.parametrize("tokens", [1, 4])
def test_adapter_on_unit_packed_weights_with_residual(cpu, tokens):
    t = packed(routed_tensors(seed=50 + tokens))
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
    thr = gap_threshold(reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"]), 0.35)
    residual = torch.randn(tokens, H, generator=torch.Generator().manual_seed(9))
    before = residual.clone()
    y = check(cpu, x, t, adapter(6, 16), thr, residual=residual)
    assert y.data_ptr() == residual.data_ptr() and not torch.equal(y, before)


def test_every_unit_path_ignores_the_adapter(cpu):
    """unit_ffn (the dense path of a routed layer) is the base FFN, adapter or not."""
    t = routed_tensors(seed=3)
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(2))
    dense = cpu.unit_ffn(x, t["w_gate"], t["w_up"], t["w_down_t"])
    every, n = cpu.routed_ffn(x, **t, threshold=-math.inf, min_units=0, max_units=F, adapter=adapter(1, 4))
    torch.testing.assert_close(every, reference.routed_ffn(x, **t, threshold=-math.inf, min_units=0, max_units=F,
                                                           adapter=adapter(1, 4))[0], rtol=1e-4, atol=1e-5)
    assert n.tolist() == [F, F]
    assert not torch.allclose(every, dense)  # routed at density 1 still applies it; only unit_ffn is the base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_routed_ffn_with_adapter_matches_reference():
    gpu = get_kernel("triton")
    t = routed_tensors(seed=60)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(60))
    thr = gap_threshold(reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"]), 0.35)
    a = adapter(7, 16)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=F, adapter=a)
    on = {k: v.cuda() for k, v in t.items()}
    y, n = gpu.routed_ffn(x.cuda(), **on, threshold=thr, min_units=0, max_units=F,
                          adapter=reference.Adapter(*(v.cuda() for v in a)))
    assert n.cpu().tolist() == n_ref.tolist()
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-5)
