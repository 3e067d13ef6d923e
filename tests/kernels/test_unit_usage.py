"""Unit-usage counting in the routed kernels: each call adds its final selection (after the min/max
guards) to a usage counter [F], as ``reference.add_usage`` defines it."""

import pytest
import torch

from adaroute.kernels import cpu, get_kernel, known_kernels, quant_cpu, reference
from adaroute.kernels import quant_reference as qr
from tests.kernels.test_kernels import F, H, gap_threshold, routed_tensors

ROUTER = ("shadow_q", "shadow_scale", "unit_bias")


@pytest.fixture(scope="module", autouse=True)
def native():
    assert cpu.uses_native() and quant_cpu._lib() is not None, "the compiled CPU kernels did not build"


def start_counts(seed: int) -> torch.Tensor:
    """A counter that already holds counts, so a kernel that overwrites instead of adding fails."""
    return torch.randint(0, 50, (F,), dtype=torch.int64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tokens", [1, 3, 6])
@pytest.mark.parametrize(("min_units", "max_units"), [(0, F), (30, F), (0, 7), (30, 20)])
def test_every_kernel_adds_the_reference_selection(tokens, min_units, max_units):
    """Threshold only, and guards that bind (the CPU kernel's correction pass): usage += mask.sum(0), for
    every registered kernel (CPU tensors: the Triton kernel's PyTorch path where it has no GPU)."""
    t = routed_tensors(tokens)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens + 1))
    scores = reference.router_scores(x, *(t[k] for k in ROUTER))
    threshold = gap_threshold(scores, 0.3)
    mask = reference.select_units(scores, threshold, min_units, max_units)  # [T, F]
    args = (x, t["w_gate"], t["w_up"], t["w_down_t"], *(t[k] for k in ROUTER), threshold, min_units, max_units)
    for kernel in map(get_kernel, known_kernels()):
        usage = start_counts(tokens)
        expect = usage + mask.sum(0)
        _, counts = kernel.routed_ffn(*args, usage=usage)
        assert torch.equal(usage, expect), kernel.NAME
        assert torch.equal(counts, mask.sum(-1))


def test_cpu_usage_off_and_wrong_counters():
    t = routed_tensors(0)
    x = torch.randn(2, H)
    args = (x, t["w_gate"], t["w_up"], t["w_down_t"], *(t[k] for k in ROUTER), -4.0, 0, F)
    y_off, _ = cpu.routed_ffn(*args)
    y_on, _ = cpu.routed_ffn(*args, usage=torch.zeros(F, dtype=torch.int64))
    assert torch.equal(y_on, y_off)  # counting changes nothing else
    for bad in (torch.zeros(F), torch.zeros(F - 1, dtype=torch.int64), torch.zeros(F, 2, dtype=torch.int64)[:, 0]):
        with pytest.raises(ValueError, match="usage must be a contiguous CPU int64 tensor"):
            cpu.routed_ffn(*args, usage=bad)


@pytest.mark.parametrize("tokens", [1, 70])  # 70: two slices of the quantised kernel's 64 tokens
@pytest.mark.parametrize("shadow", [True, False])  # int4-shadow scores, or exact gate/up scores
def test_quantised_usage_adds_the_selection(tokens, shadow):
    t = routed_tensors(tokens + 3)
    fmt = "q8_0"
    store = torch.stack([qr.quantize(t[k], fmt).data for k in ("w_gate", "w_up", "w_down_t")], dim=1)
    units = [qr.QuantWeight(store[:, k], fmt, H) for k in range(3)]
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(4))
    floats = [u.dequantize() for u in units]
    router = (t["shadow_q"], t["shadow_scale"]) if shadow else (t["shadow_q"][:0], t["shadow_scale"][:0])
    scores = (reference.router_scores(x, *router, t["unit_bias"]) if shadow
              else qr.exact_scores(x, *floats[:2], t["unit_bias"]))
    threshold = gap_threshold(scores, 0.4)
    mask = reference.select_units(scores, threshold, 5, 60)
    usage = start_counts(tokens)
    expect = usage + mask.sum(0)
    _, counts = quant_cpu.routed_ffn(x, *units, *router, t["unit_bias"], threshold, 5, 60, usage=usage)
    assert torch.equal(counts, mask.sum(-1))
    assert torch.equal(usage, expect)
