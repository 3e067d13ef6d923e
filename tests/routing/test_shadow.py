import pytest
import torch

from adaroute.routing.router import OracleRouter, ShadowRouter
from adaroute.routing.shadow import dequantize, pack_int4, quantize_int4, unpack_int4


def test_pack_roundtrip_and_nibble_order():
    q = torch.randint(-8, 8, (6, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert torch.equal(unpack_int4(packed), q)
    # low nibble = even column, stored code = q + 8
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_quantize_error_is_small_and_codes_in_range():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_int4(w, 32)
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == (16, 2)
    rel = (dequantize(pack_int4(q), scale) - w).norm() / w.norm()
    assert rel < 0.12


def test_group_size_must_divide_hidden():
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 48), 32)


def test_untrained_router_tracks_the_oracle():
    g = torch.Generator().manual_seed(2)
    wg, wu, wd = (torch.randn(96, 64, generator=g) / 8 for _ in range(3))
    router = ShadowRouter.from_weights(wg, wu, wd, 32)
    oracle = OracleRouter(wg, wu, wd, torch.nn.SiLU())
    x = torch.randn(50, 64, generator=g)
    s, o = router.score(x), oracle.score(x)
    assert s.shape == (50, 96)
    top_s, top_o = (torch.zeros_like(v, dtype=torch.bool).scatter(1, v.topk(48, -1).indices, True) for v in (s, o))
    assert (top_s & top_o).sum() / top_o.sum() > 0.85  # int4 picks nearly the oracle's top half
