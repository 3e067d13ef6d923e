"""Fast kernels against the reference on random inputs and random unit sets.

Scores near the threshold can legitimately land on either side under a different summation order,
so thresholds are placed in the middle of a wide gap between neighbouring scores.
"""

import math

import pytest
import torch

from adaroute.kernels import get_kernel, known_kernels, reference

H, F = 64, 96  # tiny layer; H a multiple of the int4 group


@pytest.fixture(scope="module")
def cpu():
    kernel = get_kernel("cpu")
    if not kernel.uses_native():
        pytest.skip("cpu kernels could not be built here")
    return kernel


def routed_tensors(seed: int, h: int = H, f: int = F, group: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w_gate": torch.randn(f, h, generator=g) / math.sqrt(h),
        "w_up": torch.randn(f, h, generator=g) / math.sqrt(h),
        "w_down_t": torch.randn(f, h, generator=g) / math.sqrt(f),
        "shadow_q": torch.randint(0, 256, (2 * f, h // 2), dtype=torch.uint8, generator=g),
        "shadow_scale": torch.rand(2 * f, h // group, generator=g) * 0.05 + 0.01,
        "unit_bias": torch.randn(f, generator=g) * 0.3,
    }


def gap_threshold(scores: torch.Tensor, density: float) -> float:
    """A threshold near the density quantile of the scores [T, F], centred in a wide gap."""
    flat = scores.flatten().sort().values
    k = int((1 - density) * (flat.numel() - 1))
    lo, hi = max(1, k - 10), min(flat.numel() - 1, k + 10)
    gaps = flat[lo:hi + 1] - flat[lo - 1:hi]
    j = lo + int(gaps.argmax())
    return float((flat[j - 1] + flat[j]) / 2)


def test_unknown_kernel_is_a_loud_error():
    with pytest.raises(ValueError, match="known kernels"):
        get_kernel("nope")
    assert {"reference", "cpu"} <= set(known_kernels())


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 9])
def test_dense_helpers_match_reference(cpu, tokens):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g)
    w1, w2, w3 = (torch.randn(m, H, generator=g) for m in (37, 8, 64))
    torch.testing.assert_close(cpu.linear(x, w1), reference.linear(x, w1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.linear_multi(x, [w1, w2]), reference.linear_multi(x, [w1, w2]))
    torch.testing.assert_close(cpu.gate_up_silu(x, w1, w1), reference.gate_up_silu(x, w1, w1))
    torch.testing.assert_close(cpu.rmsnorm(x, w3[0], 1e-5), reference.rmsnorm(x, w3[0], 1e-5))
    res = torch.randn(tokens, 64, generator=g)
    torch.testing.assert_close(cpu.linear(x, w3, residual=res.clone()), reference.linear(x, w3, res.clone()))


def test_odd_input_length_uses_masked_tail(cpu):
    x, w = torch.randn(2, 50), torch.randn(7, 50)
    torch.testing.assert_close(cpu.linear(x, w), reference.linear(x, w))


@pytest.mark.parametrize("tokens", [1, 2, 4, 6])
@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_routed_ffn_matches_reference(cpu, tokens, density):
    t = routed_tensors(seed=tokens)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(100 + tokens))
    assert_routed_matches_reference(cpu, x, t, density)


def assert_routed_matches_reference(cpu, x, t, density):
    """cpu.routed_ffn == reference.routed_ffn (units per token and output) at a threshold giving
    ``density`` (0.0: no unit, 1.0: every unit), no guards."""
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    thr = {0.0: math.inf, 1.0: -math.inf}.get(density) or gap_threshold(scores, density)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=F)
    y, n = cpu.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=F)
    assert n.tolist() == n_ref.tolist()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("min_units", "max_units"), [(10, F), (0, 7), (30, 20), (F + 5, F)])
def test_routed_guards_match_reference(cpu, min_units, max_units):
    t = routed_tensors(seed=7)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    thr = gap_threshold(scores, 0.4)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=min_units, max_units=max_units)
    y, n = cpu.routed_ffn(x, **t, threshold=thr, min_units=min_units, max_units=max_units)
    assert n.tolist() == n_ref.tolist()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_routed_with_larger_scale_groups(cpu):
    t = routed_tensors(seed=11, group=64)
    x = torch.randn(2, H)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=-1.0, min_units=5, max_units=60)
    y, n = cpu.routed_ffn(x, **t, threshold=-1.0, min_units=5, max_units=60)
    assert n.tolist() == n_ref.tolist()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 5])
@pytest.mark.parametrize(("h", "f", "group"), [(64, 40, 32), (128, 200, 64), (576, 1536, 32)])
def test_routed_ffn_scores_from_the_g16_layout(cpu, tokens, h, f, group):
    """The kernels score from the g16 layout: units not a multiple of its 16 (a padded last record),
    wider scale groups, the embedded model's layer shape."""
    t = routed_tensors(seed=f + tokens, h=h, f=f, group=group)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(f))
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    thr = gap_threshold(scores, 0.35)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=f)
    y, n = cpu.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=f)
    assert n.tolist() == n_ref.tolist()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_g16_layout_holds_the_shadow_and_follows_changes():
    """Each record of ``shadow_g16`` read back by its definition gives the codes and scales."""
    from adaroute.kernels import cpu as cpu_module

    f, h, groups = 40, 96, 3
    t = routed_tensors(seed=3, h=h, f=f, group=32)
    q, s = t["shadow_q"], t["shadow_scale"]
    packed = cpu_module.shadow_g16(q, s)
    records = 3  # ceil(40 / 16): the last one padded
    assert packed.shape == (records, 16 * h + 128 * groups) and packed.dtype == torch.uint8
    codes = torch.stack((q & 0xF, q >> 4), dim=-1).reshape(2 * f, h).tolist()  # [2F, H] stored nibbles
    scales = packed[:, 16 * h:].contiguous().view(torch.float32).view(records, 2, groups, 16)
    for r in range(records):
        for lane in range(16):
            unit = 16 * r + lane
            for part, rows in ((0, 0), (1, f)):  # gate codes, then up codes
                for c in range(h // 8):
                    for k in range(4):
                        byte = int(packed[r, part * 8 * h + (c * 16 + lane) * 4 + k])
                        row = codes[rows + unit] if unit < f else None
                        want = (row[8 * c + k], row[8 * c + 4 + k]) if row is not None else (0, 0)
                        assert (byte & 0xF, byte >> 4) == want
                for grp in range(groups):
                    want = float(s[rows + unit, grp]) if unit < f else 0.0
                    assert float(scales[r, part, grp, lane]) == want
    assert cpu_module.shadow_g16(q, s) is packed  # made once per shadow
    with torch.no_grad():
        s.mul_(2.0)  # changed in place: made again
    assert not torch.equal(cpu_module.shadow_g16(q, s), packed)


def test_full_set_equals_dense_ffn(cpu):
    t = routed_tensors(seed=5)
    x = torch.randn(2, H)
    dense = reference.dense_ffn(x, t["w_gate"], t["w_up"], t["w_down_t"].t().contiguous())
    y, n = cpu.routed_ffn(x, **t, threshold=-math.inf, min_units=0, max_units=F)
    assert n.tolist() == [F, F]
    torch.testing.assert_close(y, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cpu.unit_ffn(x, t["w_gate"], t["w_up"], t["w_down_t"]), dense, rtol=1e-4, atol=1e-5)


def test_residual_is_accumulated_in_place(cpu):
    t = routed_tensors(seed=9)
    x = torch.randn(1, H)
    res = torch.randn(1, H)
    expect = res + reference.routed_ffn(x, **t, threshold=-0.5, min_units=0, max_units=F)[0]
    out, _ = cpu.routed_ffn(x, **t, threshold=-0.5, min_units=0, max_units=F, residual=res)
    assert out.data_ptr() == res.data_ptr()
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)


def test_many_tokens_fall_back_to_reference(cpu):
    x, w = torch.randn(cpu.MAX_GEMV_TOKENS + 1, H), torch.randn(5, H)
    torch.testing.assert_close(cpu.linear(x, w), reference.linear(x, w))


CHECK_SCRIPT = """
import math, torch, warnings
from adaroute.kernels import cpu, reference
from tests.kernels.test_kernels import routed_tensors, F
warnings.simplefilter("always")
torch.manual_seed(0)  # a score near log(0) can differ by more than the tolerance under another summation order
x, w = torch.randn(3, 64), torch.randn(40, 64)
assert torch.allclose(cpu.linear(x, w), reference.linear(x, w), rtol=1e-4, atol=1e-4)
t = routed_tensors(seed=2)
y_ref, n_ref = reference.routed_ffn(x, **t, threshold=-math.inf, min_units=0, max_units=F)
y, n = cpu.routed_ffn(x, **t, threshold=-math.inf, min_units=0, max_units=F)
assert n.tolist() == n_ref.tolist() and torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5)
for h in (64, 160):
    tt = routed_tensors(seed=3, h=h)
    xx = torch.randn(2, h)
    s_ref = reference.router_scores(xx, tt["shadow_q"], tt["shadow_scale"], tt["unit_bias"])
    s = cpu.router_scores(xx, tt["shadow_q"], tt["shadow_scale"], tt["unit_bias"])
    assert torch.allclose(s, s_ref, rtol=1e-4, atol=1e-4), (s - s_ref).abs().max()
from adaroute.kernels import quant_cpu, quant_reference as qr
for fmt in qr.FORMATS:  # block-quantised products, GGUF's row layout and g16 (int16 activations)
    wq = qr.quantize(torch.randn(40, 64), fmt)
    for ww in (wq, qr.pack16(wq)):
        expect = qr.linear(x, ww)
        got = quant_cpu.linear(x, ww)
        assert torch.allclose(got, expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max())), (fmt, ww.layout)
print("native" if cpu.uses_native() else "fallback")
"""


def _run_check(tmp_path, **env):
    import os
    import subprocess
    import sys

    full = {**os.environ, "ADAROUTE_EXT_DIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", CHECK_SCRIPT], env=full, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr
    return done


def test_portable_build_matches_reference(tmp_path):
    """The code path for CPUs without AVX-512 (built for the baseline instruction set)."""
    assert _run_check(tmp_path, ADAROUTE_NATIVE="0").stdout.strip() == "native"


def test_build_failure_falls_back_to_reference_with_a_warning(tmp_path):
    done = _run_check(tmp_path, CXX="/bin/false", PATH="/nonexistent")
    assert done.stdout.strip() == "fallback"
    assert "using the reference kernels" in done.stderr


# --- router score definition: int8 activations x int4 shadow -------------------------------------

def naive_gu(x, shadow_q, shadow_scale):
    """gu [T, R] in float64 straight from the definition in ``reference``."""
    t, h = x.shape
    groups = shadow_scale.shape[1]
    xq, sx = reference.quantize_activations(x, h // groups)
    q = reference.unpack_shadow_codes(shadow_q).double().view(-1, groups, h // groups)  # [R, G, GS]
    dots = torch.einsum("tgj,rgj->trg", xq.double().view(t, groups, -1), q)  # [T, R, G], integers
    return (dots * sx.double().unsqueeze(1) * shadow_scale.double().unsqueeze(0)).sum(-1)


def test_quantize_activations_rounds_half_to_even_per_group():
    x = torch.zeros(2, 64)
    x[0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: halves round to even
    x[0, 32:36] = torch.tensor([-254.0, 3.0, 1.0, 0.9999])  # scale 2
    xq, sx = reference.quantize_activations(x, 32)
    assert xq.dtype == torch.int8 and sx.shape == (2, 2)
    assert sx.tolist() == [[1.0, 2.0], [0.0, 0.0]]  # an all-zero group: scale 0, codes 0
    assert xq[0, :4].tolist() == [127, 0, 2, -2] and xq[0, 32:36].tolist() == [-127, 2, 0, 0]
    assert int(xq[1].abs().sum()) == 0
    x = torch.randn(5, 96)
    xq, sx = reference.quantize_activations(x, 32)
    assert int(xq.abs().max()) == 127
    torch.testing.assert_close(xq.float().view(5, 3, 32) * sx.unsqueeze(-1), x.view(5, 3, 32),
                               atol=float(sx.max()) / 2 + 1e-6, rtol=0)


@pytest.mark.parametrize("group", [32, 64])
def test_reference_scores_follow_the_definition_and_train_scales(group):
    t = routed_tensors(seed=3, group=group)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(4))
    x[1, :group] = 0.0
    scale = t["shadow_scale"].clone().requires_grad_()
    bias = t["unit_bias"].clone().requires_grad_()
    got = reference.router_scores(x, t["shadow_q"], scale, bias)
    gu = naive_gu(x, t["shadow_q"], scale)
    want = torch.log((torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]).abs() + 1e-20) + bias.double()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    w = torch.randn(4, F, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((got * w).sum(), [scale, bias])
    want_grads = torch.autograd.grad((want * w).sum(), [scale, bias])
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize("tokens", [1, 2, 5])
@pytest.mark.parametrize(("h", "group"), [(64, 32), (160, 32), (576, 32), (576, 64), (192, 96)])
def test_cpu_router_scores_match_reference(cpu, tokens, h, group):
    t = routed_tensors(seed=tokens + h, h=h, group=group)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(h))
    x[0, :group] = 0.0  # a zero group
    ref = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    got = cpu.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [32, 64])
def test_cpu_activation_codes_round_ties_as_reference(cpu, group):
    """Activations on exact halves of their group's scale (a power of two, so x / scale is exact): the
    kernels' vectorised quantisation must round every tie to even, as the reference does, and keep an
    all-zero group at codes 0. Every shadow code is +1 and the scales random, so a unit's g and u are
    random positive mixes of the groups' code sums, far from 0: one tie rounded the other way moves a
    score by ~1e-3, far beyond the float summation-order differences the tolerance allows."""
    g = torch.Generator().manual_seed(group)
    tokens, groups = 3, H // group
    scale = 2.0 ** torch.randint(-6, 2, (tokens, groups, 1), generator=g)
    halves = torch.randint(0, 126, (tokens, groups, group), generator=g) + 0.5
    halves[..., 0] = 127.0  # the group's largest magnitude: its scale
    x = (halves * scale).reshape(tokens, H)
    x[1, :group] = 0.0
    t = routed_tensors(seed=7, group=group)
    t["shadow_q"] = torch.full_like(t["shadow_q"], 0x99)  # stored nibbles 9: every code +1
    ref = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    torch.testing.assert_close(cpu.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"]), ref,
                               rtol=1e-5, atol=1e-5)
    thr = gap_threshold(ref, 0.4)
    _, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=F)
    for copy in (True, False):  # the g16 scoring layout and the rows
        _, n = cpu.routed_ffn(x, **t, threshold=thr, min_units=0, max_units=F, scoring_copy=copy)
        assert n.tolist() == n_ref.tolist()


# --- unit-packed weights: views of one [F, 3, H] store ------------------------------------------

def packed(t: dict) -> dict:
    w_units = reference.pack_units(t["w_gate"], t["w_up"], t["w_down_t"])  # [F, 3, H]
    g, u, d = reference.unit_views(w_units)
    return {**t, "w_gate": g, "w_up": u, "w_down_t": d}


def test_unit_views_are_detected():
    t = routed_tensors(seed=1)
    p = packed(t)
    assert reference.is_unit_packed(p["w_gate"], p["w_up"], p["w_down_t"])
    assert p["w_gate"].stride() == (3 * H, 1) and not p["w_gate"].is_contiguous()
    assert not reference.is_unit_packed(t["w_gate"], t["w_up"], t["w_down_t"])
    assert not reference.is_unit_packed(p["w_up"], p["w_gate"], p["w_down_t"])  # order matters


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_routed_ffn_on_unit_packed_weights(cpu, tokens, density):
    t = packed(routed_tensors(seed=20 + tokens))
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
    assert_routed_matches_reference(cpu, x, t, density)
    dense = cpu.unit_ffn(x, t["w_gate"], t["w_up"], t["w_down_t"])
    torch.testing.assert_close(dense, reference.unit_ffn(x, t["w_gate"], t["w_up"], t["w_down_t"]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize(("density", "min_units", "max_units"),
                         [(0.2, 25, F), (0.2, 80, F), (0.6, 0, 50), (0.6, 0, 10), (0.4, 45, 45)])
def test_guard_corrections_match_reference(cpu, tokens, density, min_units, max_units):
    """Guards that add or drop a few units (corrected in place) and many (gathered again)."""
    t = routed_tensors(seed=30 + tokens)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(31))
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    thr = gap_threshold(scores, density)
    y_ref, n_ref = reference.routed_ffn(x, **t, threshold=thr, min_units=min_units, max_units=max_units)
    y, n = cpu.routed_ffn(x, **t, threshold=thr, min_units=min_units, max_units=max_units)
    assert n.tolist() == n_ref.tolist()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def _has_cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


@pytest.mark.skipif(not _has_cpu_flag("avx512bw"), reason="needs AVX-512 BW")
def test_avx512_build_without_vnni_matches_reference(tmp_path):
    """The AVX-512 scoring path for CPUs without the int8 dot-product instruction."""
    assert _run_check(tmp_path, ADAROUTE_CXXFLAGS="-mno-avx512vnni").stdout.strip() == "native"


@pytest.mark.parametrize("d", [64, 48, 40])  # vector path (multiples of 16) and the portable one
@pytest.mark.parametrize(("batch", "tokens", "padded"), [(1, 1, False), (2, 1, True), (2, 3, True)])
def test_attention_matches_reference(cpu, d, batch, tokens, padded):
    """RoPE, the cache write and grouped-query attention over a long cache (softmax over 300 keys)."""
    g = torch.Generator().manual_seed(d + 7 * tokens)
    n_heads, n_kv, slots, pos = 6, 2, 320, 300
    qkv = torch.randn(batch * tokens, (n_heads + 2 * n_kv) * d, generator=g)
    angles = torch.arange(slots).unsqueeze(1) * torch.rand(1, d // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, 1), torch.cat([angles.sin()] * 2, 1)  # [S, D]
    pad = torch.tensor([0, 17][:batch]) if padded else None
    caches = [torch.randn(batch, n_kv, slots, d, generator=g) * 2 for _ in range(2)]
    outs = []
    for kernel in (cpu, reference):
        k_cache, v_cache = (c.clone() for c in caches)
        outs.append((kernel.attention(qkv, k_cache, v_cache, cos, sin, pos, pad, n_heads), k_cache, v_cache))
    for fast, ref in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
