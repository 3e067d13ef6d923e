// The routed FFN for a few tokens in flight: score every unit from the int4 shadow, select per
// token, then read only the selected units' gate row, up row and down column (row of w_down_t).
//   G  scale groups per row (H / group_size)
//
// Scores follow adaroute/kernels/reference.py exactly: x is quantised to int8 per token and scale
// group (sx = max|x_g| / 127, codes rounded half to even), each group's dot product with the int4
// codes is an exact integer, and gu[r] = sum_g shadow_scale[r, g] * sx[g] * dot_g.
#include "common.h"

namespace {

constexpr int kScoreBlock = 128; // units scored per work item (64: twice the cold gather starts, -3-4 %)
constexpr int kScoreAhead = 8;  // units ahead whose shadow rows the scoring loop prefetches

#ifdef __AVX512F__
// log(x) for x > 0: x = m * 2^k with m in [0.75, 1.5), log m = 2 atanh((m - 1) / (m + 1)).
inline __m512 vlog(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
  __m512 k = _mm512_getexp_ps(x);
  k = _mm512_mask_add_ps(k, _mm512_cmp_ps_mask(m, one, _CMP_LT_OQ), k, one);
  const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 p = _mm512_set1_ps(1.0f / 9);
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 7));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 5));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 3));
  p = _mm512_fmadd_ps(p, s2, one);
  return _mm512_fmadd_ps(k, _mm512_set1_ps(0.693147180559945f), _mm512_mul_ps(_mm512_add_ps(s, s), p));
}
#endif

// score[i] = log(|silu(g[i]) * u[i]| + 1e-20) + bias[i] for n units.
inline void unit_scores(const float* g, const float* u, const float* bias, int64_t n, float* score) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f), tiny = _mm512_set1_ps(1e-20f);
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    const __m512 z = _mm512_add_ps(_mm512_abs_ps(_mm512_mul_ps(_mm512_mul_ps(gv, sig), uv)), tiny);
    _mm512_mask_storeu_ps(score + i, m, _mm512_add_ps(vlog(z), _mm512_maskz_loadu_ps(m, bias + i)));
  }
#endif
  for (; i < n; ++i) score[i] = std::log(std::fabs(silu(g[i]) * u[i]) + 1e-20f) + bias[i];
}
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define AR_INT8_SIMD 1
// acc + sum of four u8 x s8 products per int32 lane (no saturation: |15 * 127 * 4| fits easily).
inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  // maddubs adds pairs into int16 (|2 * 15 * 127| < 2^15, so it never saturates here).
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
#endif

// x quantised for scoring, in the layout the shadow rows are read in.
// A block is 64 bytes of a packed row = 128 columns; int32 lane l of a block covers bytes 4l .. 4l+3,
// i.e. columns 8l .. 8l+7 of the block, so every lane lies inside one scale group (multiple of 32).
struct QuantX {
  int64_t blocks = 0;
  std::vector<int8_t> xe, xo;      // [T, blocks, 64]: codes of the even / odd columns (0 past H)
  std::vector<int32_t> neg_corr;   // [T, blocks, 16]: -8 * (sum of the lane's 8 codes): stored nibbles are q + 8
  std::vector<float> sx;           // [T, blocks, 16]: the lane's activation scale (0 past H)
  std::vector<int32_t> sidx;       // [blocks, 16]: the lane's scale column, relative to sbase
  std::vector<int64_t> sbase;      // [blocks]: first scale column of the block
  std::vector<uint16_t> smask;     // [blocks]: scale columns readable from sbase (never past the row)
  std::vector<uint64_t> bmask;     // [blocks]: bytes of the block inside the row
  std::vector<int8_t> xq;          // [T, H]: codes in column order (portable path)
  std::vector<float> sx_group;     // [T, G]
  std::vector<int32_t> corr_group; // [T, G]: -8 * (sum of the group's codes), for the g16 layout
  int64_t h = 0, gs = 32, scale_cols = 0;

#ifdef __AVX512F__
  // One scale group (gs a multiple of 16) as the scalar loop below quantises it, 16 lanes at a time:
  // the same float division, the same rounding (half to even) and clamp, so the same codes bit for bit.
  // Scalar, this ran before the kernel's threads started (~1 µs per call).
  void quantise_group(const float* xg, int8_t* codes, float* scale_out, int32_t* corr_out) const {
    __m512 amax = _mm512_setzero_ps();
    // Operand order as std::max / std::min below, so that a NaN is skipped (amax) or clamped to -127 alike.
    for (int64_t j = 0; j < gs; j += 16) amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xg + j)), amax);
    const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
    *scale_out = scale;
    __m512i sum = _mm512_setzero_si512();
    if (scale > 0.0f) {
      const __m512 sv = _mm512_set1_ps(scale), lim = _mm512_set1_ps(127.0f), neg = _mm512_set1_ps(-127.0f);
      for (int64_t j = 0; j < gs; j += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xg + j), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, neg), lim));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j), _mm512_cvtepi32_epi8(c));
        sum = _mm512_add_epi32(sum, c);
      }
    }  // else the codes stay 0, as build() assigned them
    *corr_out = -8 * _mm512_reduce_add_epi32(sum);
  }
#endif

  // sx = max|x_g| / 127, code = round-half-even(x / sx): the float operations of
  // reference.quantize_activations, so the codes match bit for bit.
  // rows false: only the codes in column order (what the g16 layout reads), not the row layout's copies.
  void build(const float* x, int nt, int64_t h_, int64_t group_size, bool rows = true) {
    h = h_;
    gs = group_size;
    scale_cols = h / gs;
    blocks = (h / 2 + 63) / 64;
    xq.assign(static_cast<size_t>(nt) * h, 0);
    sx_group.assign(static_cast<size_t>(nt) * scale_cols, 0.0f);
    corr_group.assign(static_cast<size_t>(nt) * scale_cols, 0);
    for (int t = 0; t < nt; ++t)
      for (int64_t g = 0; g < scale_cols; ++g) {
        const float* xg = x + t * h + g * gs;
#ifdef __AVX512F__
        if (gs % 16 == 0) {
          quantise_group(xg, &xq[t * h + g * gs], &sx_group[t * scale_cols + g], &corr_group[t * scale_cols + g]);
          continue;
        }
#endif
        float amax = 0.0f;
        for (int64_t j = 0; j < gs; ++j) amax = std::max(amax, std::fabs(xg[j]));
        const float scale = amax / 127.0f;
        sx_group[t * scale_cols + g] = scale;
        int32_t sum = 0;
        if (scale > 0.0f)
          for (int64_t j = 0; j < gs; ++j) {
            const float v = std::nearbyint(xg[j] / scale);  // default rounding: half to even
            xq[t * h + g * gs + j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
            sum += xq[t * h + g * gs + j];
          }
        corr_group[t * scale_cols + g] = -8 * sum;
      }
#ifdef AR_INT8_SIMD
    if (!rows) return;
    xe.assign(static_cast<size_t>(nt) * blocks * 64, 0);
    xo.assign(static_cast<size_t>(nt) * blocks * 64, 0);
    neg_corr.assign(static_cast<size_t>(nt) * blocks * 16, 0);
    sx.assign(static_cast<size_t>(nt) * blocks * 16, 0.0f);
    sidx.assign(blocks * 16, 0);
    sbase.assign(blocks, 0);
    smask.assign(blocks, 0);
    bmask.assign(blocks, 0);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t nbytes = std::min<int64_t>(64, h / 2 - 64 * b);
      bmask[b] = nbytes >= 64 ? ~0ull : ((1ull << nbytes) - 1);
      sbase[b] = 128 * b / gs;
      int64_t top = sbase[b];
      for (int l = 0; l < 16; ++l) {
        const int64_t col = 128 * b + 8 * l;
        const int64_t sc = col < h ? col / gs : sbase[b];
        sidx[b * 16 + l] = static_cast<int32_t>(sc - sbase[b]);
        top = std::max(top, sc);
      }
      smask[b] = static_cast<uint16_t>((1u << (top - sbase[b] + 1)) - 1u);
    }
    for (int t = 0; t < nt; ++t)
      for (int64_t c = 0; c < h; ++c) {
        const int64_t b = c / 128, byte = (c % 128) / 2, lane = byte / 4;
        const int8_t v = xq[t * h + c];
        (c % 2 ? xo : xe)[(t * blocks + b) * 64 + byte] = v;
        neg_corr[(t * blocks + b) * 16 + lane] -= 8 * v;
        sx[(t * blocks + b) * 16 + lane] = sx_group[t * scale_cols + c / gs];
      }
#endif
  }
};

// gate and up pre-activations of one shadow row pair for nt tokens (int4 codes x int8 activations).
template <int NT>
inline void shadow_pair(const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su, const QuantX& qx,
                        int t0, float* gout, float* uout) {
#ifdef AR_INT8_SIMD
  const int64_t nb = qx.blocks;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 accg[NT], accu[NT];
  for (int t = 0; t < NT; ++t) accg[t] = accu[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __mmask64 bm = qx.bmask[b];
    const __m512i bg = _mm512_maskz_loadu_epi8(bm, qg + 64 * b);
    const __m512i bu = _mm512_maskz_loadu_epi8(bm, qu + 64 * b);
    const __m512i glo = _mm512_and_si512(bg, low4), ghi = _mm512_and_si512(_mm512_srli_epi16(bg, 4), low4);
    const __m512i ulo = _mm512_and_si512(bu, low4), uhi = _mm512_and_si512(_mm512_srli_epi16(bu, 4), low4);
    const __m512i idx = _mm512_loadu_si512(qx.sidx.data() + 16 * b);
    const __mmask16 sm = qx.smask[b];
    const __m512 swg = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, sg + qx.sbase[b]));
    const __m512 swu = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, su + qx.sbase[b]));
    for (int t = 0; t < NT; ++t) {
      const int64_t tb = (t0 + t) * nb + b;
      const __m512i xe = _mm512_loadu_si512(qx.xe.data() + 64 * tb);
      const __m512i xo = _mm512_loadu_si512(qx.xo.data() + 64 * tb);
      const __m512i c = _mm512_loadu_si512(qx.neg_corr.data() + 16 * tb);
      const __m512 sx = _mm512_loadu_ps(qx.sx.data() + 16 * tb);
      const __m512i dg = dot_u8s8(dot_u8s8(c, glo, xe), ghi, xo);  // exact sum of q * xq per lane
      const __m512i du = dot_u8s8(dot_u8s8(c, ulo, xe), uhi, xo);
      accg[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dg), _mm512_mul_ps(swg, sx), accg[t]);
      accu[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(du), _mm512_mul_ps(swu, sx), accu[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    gout[t] = _mm512_reduce_add_ps(accg[t]);
    uout[t] = _mm512_reduce_add_ps(accu[t]);
  }
#else
  const int64_t h = qx.h, gs = qx.gs;
  for (int t = 0; t < NT; ++t) {
    const int8_t* xq = qx.xq.data() + (t0 + t) * h;
    const float* sx = qx.sx_group.data() + (t0 + t) * qx.scale_cols;
    float ga = 0.0f, ua = 0.0f;
    for (int64_t g = 0; g < qx.scale_cols; ++g) {
      int32_t gd = 0, ud = 0;
      for (int64_t j = g * gs; j < (g + 1) * gs; j += 2) {
        const int64_t b = j / 2;
        gd += ((qg[b] & 0xF) - 8) * xq[j] + ((qg[b] >> 4) - 8) * xq[j + 1];
        ud += ((qu[b] & 0xF) - 8) * xq[j] + ((qu[b] >> 4) - 8) * xq[j + 1];
      }
      ga += sg[g] * sx[g] * static_cast<float>(gd);
      ua += su[g] * sx[g] * static_cast<float>(ud);
    }
    gout[t] = ga;
    uout[t] = ua;
  }
#endif
}

#ifdef AR_INT8_SIMD
// The four horizontal sums of a, b, c, d in one shuffle tree (four separate reductions cost as much
// as the dot products of a short row).
inline void reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  r = _mm512_add_ps(r, _mm512_permute_ps(r, 0x4E));
  r = _mm512_add_ps(r, _mm512_permute_ps(r, 0xB1));  // every lane of 128-bit chunk k: the sum of input k
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, r);
  out[0] = tmp[0], out[1] = tmp[4], out[2] = tmp[8], out[3] = tmp[12];
}

// Four shadow rows against one token (decode): shares each block of x among the rows and reduces the
// four accumulators together.
inline void shadow_rows4(const uint8_t* const* q, const float* const* sw, const QuantX& qx, int t, float* out) {
  const int64_t nb = qx.blocks;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t tb = t * nb + b;
    const __mmask64 bm = qx.bmask[b];
    const __m512i xe = _mm512_loadu_si512(qx.xe.data() + 64 * tb);
    const __m512i xo = _mm512_loadu_si512(qx.xo.data() + 64 * tb);
    const __m512i c = _mm512_loadu_si512(qx.neg_corr.data() + 16 * tb);
    const __m512 sx = _mm512_loadu_ps(qx.sx.data() + 16 * tb);
    const __m512i idx = _mm512_loadu_si512(qx.sidx.data() + 16 * b);
    const __mmask16 sm = qx.smask[b];
    for (int r = 0; r < 4; ++r) {
      const __m512i by = _mm512_maskz_loadu_epi8(bm, q[r] + 64 * b);
      const __m512i lo = _mm512_and_si512(by, low4), hi = _mm512_and_si512(_mm512_srli_epi16(by, 4), low4);
      const __m512 s = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(sm, sw[r] + qx.sbase[b]));
      const __m512i d = dot_u8s8(dot_u8s8(c, lo, xe), hi, xo);  // exact sum of q * xq per lane
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, sx), acc[r]);
    }
  }
  reduce4(acc[0], acc[1], acc[2], acc[3], out);
}
#endif

void shadow_pair_n(const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su, const QuantX& qx, int t0,
                   int nt, float* gout, float* uout) {
  switch (nt) {
    case 4: shadow_pair<4>(qg, qu, sg, su, qx, t0, gout, uout); break;
    case 3: shadow_pair<3>(qg, qu, sg, su, qx, t0, gout, uout); break;
    case 2: shadow_pair<2>(qg, qu, sg, su, qx, t0, gout, uout); break;
    default: shadow_pair<1>(qg, qu, sg, su, qx, t0, gout, uout); break;
  }
}

#ifdef AR_INT8_SIMD
// The int4 shadow in the decode layout ("g16", adaroute/kernels/cpu.py: shadow_g16), one record per 16
// units: gate codes [H/8][16 lanes][4 bytes], up codes likewise, then gate scales [G][16] and up scales
// [G][16] (float32). Lane j's 4 bytes of chunk c hold unit 16g + j's stored nibbles of columns
// 8c..8c+3 (low) and 8c+4..8c+7 (high), so one vpdpbusd against 4 activation codes broadcast does a
// step of 16 units' dot products: no per-row reduction, no split loads, one stream per record.
// Same integers and scales as the row layout (reference.router_scores), summed in another order.
inline int64_t g16_record_bytes(int64_t h, int64_t scale_cols) { return 16 * h + 128 * scale_cols; }

// Gate and up pre-activations of one record's 16 units for NT tokens t0.. into g[t][16], u[t][16].
// ``next`` (may be null): the record scored next, requested line by line as this one streams (its two
// 4.6 KB code runs are too short for the hardware prefetcher to ramp up on).
template <int NT>
inline void g16_record(const uint8_t* rec, const QuantX& qx, int t0, float* g, float* u, int64_t ldo,
                       const uint8_t* next) {
  const int64_t h = qx.h, gcols = qx.scale_cols, chunks = qx.gs / 8;
  const uint8_t *cg = rec, *cu = rec + 8 * h;
  const float* sg = reinterpret_cast<const float*>(rec + 16 * h);
  const float* su = sg + 16 * gcols;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 accg[NT], accu[NT];
  for (int t = 0; t < NT; ++t) accg[t] = accu[t] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < gcols; ++grp) {
    __m512i ig[NT], iu[NT];
    for (int t = 0; t < NT; ++t) ig[t] = iu[t] = _mm512_set1_epi32(qx.corr_group[(t0 + t) * gcols + grp]);
    if (next) {
      _mm_prefetch(reinterpret_cast<const char*>(next + 16 * h + 64 * grp), _MM_HINT_T0);  // its scales
      _mm_prefetch(reinterpret_cast<const char*>(next + 16 * h + 64 * (gcols + grp)), _MM_HINT_T0);
    }
    for (int64_t c = grp * chunks; c < (grp + 1) * chunks; ++c) {
      if (next) {
        _mm_prefetch(reinterpret_cast<const char*>(next + 64 * c), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next + 8 * h + 64 * c), _MM_HINT_T0);
      }
      const __m512i vg = _mm512_loadu_si512(cg + 64 * c), vu = _mm512_loadu_si512(cu + 64 * c);
      const __m512i glo = _mm512_and_si512(vg, low4), ghi = _mm512_and_si512(_mm512_srli_epi16(vg, 4), low4);
      const __m512i ulo = _mm512_and_si512(vu, low4), uhi = _mm512_and_si512(_mm512_srli_epi16(vu, 4), low4);
      for (int t = 0; t < NT; ++t) {
        int32_t xa, xb;  // the activation codes of columns 8c..8c+3 and 8c+4..8c+7
        std::memcpy(&xa, qx.xq.data() + (t0 + t) * h + 8 * c, 4);
        std::memcpy(&xb, qx.xq.data() + (t0 + t) * h + 8 * c + 4, 4);
        const __m512i va = _mm512_set1_epi32(xa), vb = _mm512_set1_epi32(xb);
        ig[t] = dot_u8s8(dot_u8s8(ig[t], glo, va), ghi, vb);
        iu[t] = dot_u8s8(dot_u8s8(iu[t], ulo, va), uhi, vb);
      }
    }
    const __m512 wsg = _mm512_loadu_ps(sg + 16 * grp), wsu = _mm512_loadu_ps(su + 16 * grp);
    for (int t = 0; t < NT; ++t) {
      const __m512 sx = _mm512_set1_ps(qx.sx_group[(t0 + t) * gcols + grp]);
      accg[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ig[t]), _mm512_mul_ps(wsg, sx), accg[t]);
      accu[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iu[t]), _mm512_mul_ps(wsu, sx), accu[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    _mm512_storeu_ps(g + t * ldo, accg[t]);
    _mm512_storeu_ps(u + t * ldo, accu[t]);
  }
}
#endif

// a . b for a short vector (an adapter's rank): one accumulator and one reduction, no set-up.
inline float dot_short(const float* a, const float* b, int64_t n) {
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - k)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.0f;
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
#endif
}

// Keeps the k highest-scoring entries of idx (k < idx.size()), returned in ascending unit order so
// that the compute phase walks memory forwards.
void keep_top(std::vector<int>& idx, const float* score, int64_t k) {
  std::nth_element(idx.begin(), idx.begin() + k, idx.end(),
                   [score](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
}

// Selection policy for one token: threshold, then the min / max guards, in that order.
int64_t select_token(const float* score, int64_t f, float threshold, int64_t min_units, int64_t max_units,
                     uint8_t* mask) {
  std::vector<int> idx;
  idx.reserve(f);
  for (int64_t i = 0; i < f; ++i)
    if (score[i] >= threshold) idx.push_back(static_cast<int>(i));
  if (static_cast<int64_t>(idx.size()) < min_units) {
    idx.resize(f);
    for (int64_t i = 0; i < f; ++i) idx[i] = static_cast<int>(i);
    keep_top(idx, score, std::min(min_units, f));
  }
  if (static_cast<int64_t>(idx.size()) > max_units) keep_top(idx, score, std::max<int64_t>(max_units, 0));
  std::memset(mask, 0, f);
  for (int i : idx) mask[i] = 1;
  return static_cast<int64_t>(idx.size());
}

// One routed FFN call: the inputs, the scratch, and the three kinds of work on them.
struct RoutedCall {
  const float *x, *wg, *wu, *wd_t, *shadow_scale, *unit_bias;
  const uint8_t* shadow_q;
  int nt;
  const uint8_t* shadow_g16 = nullptr;  // the shadow in the g16 layout (null: the row layout only)
  int64_t h, ldw, f, half, scale_cols;  // ldw: row stride of the three weights
  float threshold;
  QuantX qx;                         // x as int8 codes for scoring
  std::vector<float> score;          // [T, F]
  std::vector<uint8_t> mask;         // [T, F]: unit computed for token
  std::vector<int8_t> change;        // [T, F]: +1 / -1 unit added / dropped by the guards (correction pass)
  bool correcting = false;           // gather_unit adds change * contribution instead of mask * contribution
  // Routing adapter (rank 0: none), see reference.Adapter: a_in [2r, H], a_units [F, 3, r], a_out [H, r].
  int64_t rank = 0;
  const float *a_in = nullptr, *a_units = nullptr, *a_out = nullptr;
  std::vector<float> z;              // [T, 2r]: x @ a_in^T, computed once per call

  // Row k of the adapter's input projection into z (z sized [T, 2r] beforehand); the threads split the
  // 2r rows (one thread reading all of a_in, 4r H bytes, took ~2 % of a routed decode step).
  void project_adapter_row(int64_t k) {
    float out[kMaxTokens];
    dot_tokens(a_in + k * h, x, h, h, nt, out, nullptr);
    for (int t = 0; t < nt; ++t) z[t * 2 * rank + k] = out[t];
  }

  // Scores of units [i0, i1) for every token, and the threshold part of the selection.
  // With the g16 layout i0 is a multiple of 16 and i1 one too, or f.
  void score_units(int64_t i0, int64_t i1) {
    float gh[kMaxTokens * kScoreBlock], uh[kMaxTokens * kScoreBlock];  // [T][units]
    const int64_t n = i1 - i0;
    int64_t i = i0;
#ifdef AR_INT8_SIMD
    if (shadow_g16 != nullptr) {
      const int64_t rec = g16_record_bytes(h, scale_cols);
      for (; i < i1; i += 16) {
        const uint8_t* r = shadow_g16 + (i / 16) * rec;
        const uint8_t* next = i + 16 < f ? r + rec : nullptr;  // past this range too: often scored next
        for (int t0 = 0; t0 < nt; t0 += kTokBlock) {
          float* g = gh + t0 * kScoreBlock + (i - i0);
          float* u = uh + t0 * kScoreBlock + (i - i0);
          const uint8_t* pf = t0 == 0 ? next : nullptr;
          switch (std::min(kTokBlock, nt - t0)) {
            case 4: g16_record<4>(r, qx, t0, g, u, kScoreBlock, pf); break;
            case 3: g16_record<3>(r, qx, t0, g, u, kScoreBlock, pf); break;
            case 2: g16_record<2>(r, qx, t0, g, u, kScoreBlock, pf); break;
            default: g16_record<1>(r, qx, t0, g, u, kScoreBlock, pf); break;
          }
        }
      }
      i = i1;
    }
    if (nt == 1)  // decode: two units (four rows) at a time
      for (; i + 2 <= i1; i += 2) {
        const uint8_t* q[4] = {shadow_q + i * half, shadow_q + (f + i) * half, shadow_q + (i + 1) * half,
                               shadow_q + (f + i + 1) * half};
        const float* sw[4] = {shadow_scale + i * scale_cols, shadow_scale + (f + i) * scale_cols,
                              shadow_scale + (i + 1) * scale_cols, shadow_scale + (f + i + 1) * scale_cols};
        const int64_t a = std::min(i + kScoreAhead, f - 2);  // rows a few units on, into L2
        for (int64_t b = 0; b < 2 * half; b += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(shadow_q + a * half + b), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(shadow_q + (f + a) * half + b), _MM_HINT_T1);
        }
        for (int64_t b = 0; b < 2 * scale_cols; b += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(shadow_scale + a * scale_cols + b), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(shadow_scale + (f + a) * scale_cols + b), _MM_HINT_T1);
        }
        float r[4];
        shadow_rows4(q, sw, qx, 0, r);
        gh[i - i0] = r[0], uh[i - i0] = r[1], gh[i + 1 - i0] = r[2], uh[i + 1 - i0] = r[3];
      }
#endif
    for (; i < i1; ++i)
      for (int t0 = 0; t0 < nt; t0 += kTokBlock) {
        const int nc = std::min(kTokBlock, nt - t0);
        float g[kTokBlock], u[kTokBlock];
        shadow_pair_n(shadow_q + i * half, shadow_q + (f + i) * half, shadow_scale + i * scale_cols,
                      shadow_scale + (f + i) * scale_cols, qx, t0, nc, g, u);
        for (int t = 0; t < nc; ++t) {
          gh[(t0 + t) * kScoreBlock + (i - i0)] = g[t];
          uh[(t0 + t) * kScoreBlock + (i - i0)] = u[t];
        }
      }
    for (int t = 0; t < nt; ++t) {
      float* st = &score[t * f + i0];
      unit_scores(gh + t * kScoreBlock, uh + t * kScoreBlock, unit_bias + i0, n, st);
      for (int64_t k = 0; k < n; ++k) mask[t * f + i0 + k] = st[k] >= threshold;
    }
  }

  bool wanted(int64_t i) const {
    for (int t = 0; t < nt; ++t)
      if (mask[t * f + i]) return true;
    return false;
  }

  // acc[t] += silu(g) * u * w_down_t[i] for the tokens that selected unit i; prefetches unit ``ahead``.
  // With an adapter, g and u get unit i's low-rank terms and acc's adapter part (acc + nt * h, [T, r])
  // gathers a * A_d[:, i]: only the selected units' 3r adapter values are read.
  void gather_unit(int64_t i, int64_t ahead, float* acc) const {
    float g[kMaxTokens], u[kMaxTokens], a[kMaxTokens];
    dot_tokens(wg + i * ldw, x, h, h, nt, g, wg + ahead * ldw);
    dot_tokens(wu + i * ldw, x, h, h, nt, u, wu + ahead * ldw);
    const float* au = a_units + i * 3 * rank;  // [3, r]: B_g row, B_u row, A_d column
    if (rank) {
#ifdef __AVX512F__
      // Like the unit's weight rows, its 3r adapter values are scattered: ask for the next unit's early
      // (without this a rank-16 adapter cost ~5x its byte share, each unit waiting on a cache miss).
      const float* next = a_units + ahead * 3 * rank;
      for (int64_t k = 0; k < 3 * rank; k += 16) _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T0);
#endif
      float dg[kMaxTokens], du[kMaxTokens];
      dot_tokens(au, z.data(), 2 * rank, rank, nt, dg, nullptr);
      dot_tokens(au + rank, z.data() + rank, 2 * rank, rank, nt, du, nullptr);
      for (int t = 0; t < nt; ++t) g[t] += dg[t], u[t] += du[t];
    }
    for (int t = 0; t < nt; ++t) {
      const float c = correcting ? static_cast<float>(change[t * f + i]) : static_cast<float>(mask[t * f + i]);
      a[t] = c != 0.0f ? c * (silu(g[t]) * u[t]) : 0.0f;
    }
    axpy_tokens(wd_t + i * ldw, a, nt, acc, h, h, wd_t + ahead * ldw);
    if (rank) axpy_tokens(au + 2 * rank, a, nt, acc + nt * h, rank, rank, nullptr);
  }

#ifdef AR_INT8_SIMD
  // Decode (one token): the listed units (at most a score block) in two passes, four units at a time.
  // A: gate and up rows against x, eight rows in flight with one shared reduction per four (each unit's
  // down row requested into L2 meanwhile); silu(g) * u for the four. B: the down rows added into acc,
  // which is loaded and stored once per four units. The sums of gather_unit, in another order: unit by
  // unit, the work between two rows (a reduction, silu, the load and store of acc) cost more than the
  // rows' own bytes when they come from cache, and held the next unit's loads back.
  void gather_units1(const int* units, int64_t n, float* acc, int64_t s0, int64_t s1) {
    float a[kScoreBlock];
    int64_t scored = s0;
    auto score_upto = [&](int64_t done) {  // interleave the next block's scoring, by share of the work
      const int64_t upto = s0 + (s1 - s0) * done / (2 * n) / 16 * 16;  // whole records of 16 units
      if (upto > scored) score_units(scored, upto);
      scored = std::max(scored, upto);
    };
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; p += 4) {
      const int m = static_cast<int>(std::min<int64_t>(4, n - p));
      // No software prefetch of the next four units' rows: the hardware prefetcher fetches them, and
      // requesting their gate rows here as well cost ~5 % of routed decode (docs/perf.md, item 34).
      const float *rg[4], *ru[4], *rd[4];
      for (int r = 0; r < 4; ++r) {
        const int64_t i = units[p + std::min(r, m - 1)];  // a short group repeats its last unit (not summed)
        rg[r] = wg + i * ldw, ru[r] = wu + i * ldw, rd[r] = wd_t + i * ldw;
      }
      if (rank)  // the next four's adapter values (3r each, scattered like their rows): needed after this loop
        for (int r = 0; r < 4; ++r) {
          const char* v = reinterpret_cast<const char*>(a_units + units[std::min(p + 4 + r, n - 1)] * 3 * rank);
          for (int64_t b = 0; b < 3 * rank * 4; b += 64) _mm_prefetch(v + b, _MM_HINT_T0);
        }
      __m512 ag[4] = {zero, zero, zero, zero}, au[4] = {zero, zero, zero, zero};
      for (int64_t kk = 0; kk < h; kk += 16) {
        const __mmask16 km = h - kk >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (h - kk)) - 1u);
        const __m512 xv = _mm512_maskz_loadu_ps(km, x + kk);
        for (int r = 0; r < 4; ++r) {
          ag[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, rg[r] + kk), xv, ag[r]);
          au[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, ru[r] + kk), xv, au[r]);
          _mm_prefetch(reinterpret_cast<const char*>(rd[r] + kk), _MM_HINT_T1);
        }
      }
      float g[4], u[4];
      reduce4(ag[0], ag[1], ag[2], ag[3], g);
      reduce4(au[0], au[1], au[2], au[3], u);
      if (rank) {  // the units' low-rank gate/up terms: B_g and B_u rows (3r values per unit) against z
        const float *bg[4], *bu[4];
        for (int r = 0; r < 4; ++r) {
          const float* au_r = a_units + units[p + std::min(r, m - 1)] * 3 * rank;
          bg[r] = au_r, bu[r] = au_r + rank;
        }
        float dg[4], du[4];
        dots4(bg, z.data(), rank, dg);
        dots4(bu, z.data() + rank, rank, du);
        for (int r = 0; r < 4; ++r) g[r] += dg[r], u[r] += du[r];
      }
      for (int r = 0; r < m; ++r) a[p + r] = silu(g[r]) * u[r];
      score_upto(p + m);
    }
    for (int64_t p = 0; p < n; p += 4) {
      const int m = static_cast<int>(std::min<int64_t>(4, n - p));
      const float* rd[4];
      float c[4];
      for (int r = 0; r < 4; ++r) {
        rd[r] = wd_t + units[p + std::min(r, m - 1)] * ldw;
        c[r] = r < m ? a[p + r] : 0.0f;
      }
      const __m512 c0 = _mm512_set1_ps(c[0]), c1 = _mm512_set1_ps(c[1]), c2 = _mm512_set1_ps(c[2]),
                   c3 = _mm512_set1_ps(c[3]);
      for (int64_t kk = 0; kk < h; kk += 16) {
        const __mmask16 km = h - kk >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (h - kk)) - 1u);
        __m512 y = _mm512_maskz_loadu_ps(km, acc + kk);
        y = _mm512_fmadd_ps(c0, _mm512_maskz_loadu_ps(km, rd[0] + kk), y);
        y = _mm512_fmadd_ps(c1, _mm512_maskz_loadu_ps(km, rd[1] + kk), y);
        y = _mm512_fmadd_ps(c2, _mm512_maskz_loadu_ps(km, rd[2] + kk), y);
        y = _mm512_fmadd_ps(c3, _mm512_maskz_loadu_ps(km, rd[3] + kk), y);
        _mm512_mask_storeu_ps(acc + kk, km, y);
      }
      if (rank)  // the down adapter's part: a * A_d[:, i] into acc's [r] tail
        for (int r = 0; r < m; ++r) axpy_tokens(a_units + units[p + r] * 3 * rank + 2 * rank, c + r, 1, acc + h, rank,
                                                rank, nullptr);
      score_upto(n + p + m);
    }
    if (scored < s1) score_units(scored, s1);
  }

  // out[r] = rows[r] . v for four rows of length k (masked tail), one shared reduction.
  static void dots4(const float* const* rows, const float* v, int64_t k, float* out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t kk = 0; kk < k; kk += 16) {
      const __mmask16 km = k - kk >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k - kk)) - 1u);
      const __m512 vv = _mm512_maskz_loadu_ps(km, v + kk);
      for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, rows[r] + kk), vv, acc[r]);
    }
    reduce4(acc[0], acc[1], acc[2], acc[3], out);
  }
#endif

  // Gathers the listed units (ascending), interleaving the scoring of units [s0, s1): the int4
  // arithmetic then runs while the gathered rows are still on their way from memory.
  void gather_list(const std::vector<int>& units, int64_t s0, int64_t s1, float* acc) {
    const int64_t n = static_cast<int64_t>(units.size());
#ifdef AR_INT8_SIMD
    if (nt == 1 && !correcting && n > 0 && n <= kScoreBlock) {
      gather_units1(units.data(), n, acc, s0, s1);
      return;
    }
#endif
    int64_t scored = s0;
    for (int64_t p = 0; p < n; ++p) {
      // Selected rows are scattered and only ~36 cache lines long, too short for the hardware
      // prefetcher to ramp up: each row asks for the same row of the unit kAhead places on (into L2).
      gather_unit(units[p], units[std::min(p + kAhead, n - 1)], acc);
      const int64_t upto = s0 + (s1 - s0) * (p + 1) / n / 16 * 16;  // whole records of 16 units (g16)
      if (upto > scored) score_units(scored, upto);
      scored = std::max(scored, upto);
    }
    if (scored < s1) score_units(scored, s1);
  }
};

// Pipelined pass of one thread over its share of the units: one contiguous range of whole 16-unit
// records (thread_share over records), taken block by block; while a block's threshold-selected units
// are gathered, the thread's next block is scored. A contiguous share keeps the shadow's stream and
// its prefetch running from one block into the next (blocks handed out in turn to whichever thread
// came first left every block starting cold: 3-7 % slower, docs/perf.md item 29).
void pipelined_pass(RoutedCall& call, float* acc) {
  int64_t lo, hi;
  thread_share((call.f + 15) / 16, lo, hi);
  lo = std::min(call.f, lo * 16), hi = std::min(call.f, hi * 16);
  auto block_end = [&](int64_t b) { return std::min(b + kScoreBlock, hi); };
  std::vector<int> chosen;
  call.score_units(lo, block_end(lo));
  for (int64_t cur = lo; cur < hi; cur = block_end(cur)) {
    const int64_t nxt = block_end(cur);
    chosen.clear();
    for (int64_t i = cur; i < nxt; ++i)
      if (call.wanted(i)) chosen.push_back(static_cast<int>(i));
    call.gather_list(chosen, nxt, block_end(nxt), acc);
  }
}

}  // namespace

extern "C" {

// Routed FFN for a few tokens in flight (group_size a multiple of 32 dividing H): score every unit
// from the int4 shadow, select per token, and read only the selected units' gate row, up row and
// down column (row of w_down_t). all_units != 0 skips scoring and selection (the dense FFN in the
// unit-contiguous layout). y is [T, H]; with accumulate the result is added to it. counts is [T].
// ldw is the row stride of w_gate, w_up and w_down_t (H when contiguous; 3H when one unit's three
// rows are stored side by side, which turns each unit into one contiguous read).
//
// The threshold alone decides most selections, and it decides each unit on its own, so one pass
// scores and gathers together. Only when a min/max guard binds for some token is the selection
// redone with the guards (which need every score first), and the pass corrected by the units the
// guards added or dropped (or, when that is more work, thrown away and gathered again).
// usage [F] (null: not counted): each token's final selection is added to it (not with all_units).
// shadow_g16 (null: not given): the same shadow in the g16 layout (g16_record), scored instead of the
// rows where the CPU has AVX-512 BW; shadow_q and shadow_scale are still the definition and fallback.
void ar_routed_ffn(const float* x, int64_t t_count, int64_t h, int64_t f, const float* wg, const float* wu,
                   const float* wd_t, int64_t ldw, const uint8_t* shadow_q, const float* shadow_scale, int64_t group_size,
                   const float* unit_bias, float threshold, int64_t min_units, int64_t max_units,
                   int all_units, float* y, int64_t* counts, int accumulate, int nthreads, int64_t adapter_rank,
                   const float* a_in, const float* a_units, const float* a_out, int64_t* usage,
                   const uint8_t* shadow_g16) {
  const int nt = static_cast<int>(t_count);
  RoutedCall call{x, wg, wu, wd_t, shadow_scale, unit_bias, shadow_q, nt, shadow_g16, h, ldw, f, h / 2,
                  h / std::max<int64_t>(group_size, 1), threshold, {}, {}, {}};
  call.mask.assign(nt * f, all_units ? 1 : 0);
  if (!all_units) {
    call.qx.build(x, nt, h, group_size, shadow_g16 == nullptr);
    call.score.resize(nt * f);
    // The adapter belongs to the routed path only: every unit (the dense FFN) never reads it.
    call.rank = adapter_rank;
    call.a_in = a_in, call.a_units = a_units, call.a_out = a_out;
    call.z.assign(static_cast<size_t>(nt) * 2 * adapter_rank, 0.0f);
  }
  const int64_t r = call.rank;
  const size_t stride = static_cast<size_t>(nt) * (h + r);  // per thread: [T, H] output, then [T, r] adapter
  std::vector<float> zsum(static_cast<size_t>(nt) * r);     // the adapter parts summed over threads
  std::vector<float> partial;
  std::vector<int> units;
  std::vector<uint8_t> first;  // the threshold-only selection of the first pass
  bool redo = static_cast<bool>(all_units);
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp single nowait
    partial.assign(static_cast<size_t>(omp_get_num_threads()) * stride, 0.0f);
#pragma omp for schedule(static)  // its barrier also publishes partial
    for (int64_t k = 0; k < 2 * r; ++k) call.project_adapter_row(k);
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    float* acc = partial.data() + static_cast<size_t>(tid) * stride;
    if (!all_units) pipelined_pass(call, acc);
#pragma omp barrier
#pragma omp single
    {
      for (int t = 0; t < nt && !all_units; ++t) {
        counts[t] = std::count(call.mask.begin() + t * f, call.mask.begin() + (t + 1) * f, 1);
        redo = redo || counts[t] < std::min(min_units, f) || counts[t] > std::max<int64_t>(max_units, 0);
      }
    }
    if (redo) {  // guards bind (or every unit is wanted): select with every score known, then gather
      if (!all_units) {
#pragma omp single
        first = call.mask;
#pragma omp for schedule(static)
        for (int t = 0; t < nt; ++t)
          counts[t] = select_token(&call.score[t * f], f, threshold, min_units, max_units, &call.mask[t * f]);
      }
#pragma omp single
      {
        // The first pass already added the threshold-selected units. When the guards change fewer
        // units than the final selection holds, add the added ones and subtract the dropped ones
        // (a min guard only adds, a max guard only drops); otherwise start over.
        std::vector<int> changed;
        call.change.assign(nt * f, 0);
        for (int64_t i = 0; i < f; ++i) {
          bool any = false;
          for (int t = 0; t < nt && !all_units; ++t) {
            const int8_t d = static_cast<int8_t>(call.mask[t * f + i] - first[t * f + i]);
            call.change[t * f + i] = d;
            any = any || d != 0;
          }
          if (any) changed.push_back(static_cast<int>(i));
          if (call.wanted(i)) units.push_back(static_cast<int>(i));
        }
        if (!all_units && changed.size() < units.size()) {
          call.correcting = true;
          units.swap(changed);
        }
        if (all_units) std::fill(counts, counts + nt, f);
      }
      if (!call.correcting) std::fill(acc, acc + stride, 0.0f);
      // Each thread a contiguous share of the list (every unit, for the dense FFN: one stream of rows;
      // gather_units1's four-unit passes streamed it 10 % slower than this).
      int64_t lo, hi;
      thread_share(static_cast<int64_t>(units.size()), lo, hi);
      for (int64_t p = lo; p < hi; ++p) call.gather_unit(units[p], units[std::min(p + kAhead, hi - 1)], acc);
#pragma omp barrier
    }
    if (r) {
#pragma omp for schedule(static)
      for (int64_t c = 0; c < nt * r; ++c) {
        float s = 0.0f;
        for (int th = 0; th < team; ++th) s += partial[static_cast<size_t>(th) * stride + nt * h + c];
        zsum[c] = s;
      }
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nt * h; ++c) {
      float s = accumulate ? y[c] : 0.0f;
      for (int th = 0; th < team; ++th) s += partial[static_cast<size_t>(th) * stride + c];
      if (r) {  // the down adapter's output projection: a_out[row] . zsum[t]
        s += dot_short(a_out + (c % h) * r, zsum.data() + (c / h) * r, r);
      }
      y[c] = s;
    }
  }
  if (!all_units) add_usage(call.mask.data(), nt, f, usage);  // the mask is final here, as counts are
}

// 1 when ar_routed_ffn scores from the g16 layout alone (AVX-512 BW): given shadow_g16 it then reads
// neither shadow_q nor shadow_scale, so a caller may hold the shadow in that layout only.
int ar_scores_g16() {
#ifdef AR_INT8_SIMD
  return 1;
#else
  return 0;
#endif
}

// Router scores alone, [T, F] into out (group_size as for ar_routed_ffn).
void ar_router_scores(const float* x, int64_t t_count, int64_t h, int64_t f, const uint8_t* shadow_q,
                      const float* shadow_scale, int64_t group_size, const float* unit_bias, float* out,
                      int nthreads) {
  const int nt = static_cast<int>(t_count);
  RoutedCall call{x, nullptr, nullptr, nullptr, shadow_scale, unit_bias, shadow_q, nt, nullptr, h, h, f, h / 2,
                  h / std::max<int64_t>(group_size, 1), INFINITY, {}, {}, {}};
  call.qx.build(x, nt, h, group_size);
  call.score.resize(nt * f);
  call.mask.assign(nt * f, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t i0 = 0; i0 < f; i0 += kScoreBlock) call.score_units(i0, std::min<int64_t>(i0 + kScoreBlock, f));
  std::copy(call.score.begin(), call.score.end(), out);
}

}  // extern "C"
