// Every decoder layer of one decode step in one call: the glue between the kernels, moved out of Python.
//
// Per layer: RMSNorm -> q, k, v -> attention (RoPE, cache write) -> o + residual -> RMSNorm -> FFN +
// residual, where the FFN is dense (w_down [H, F]) or routed: sparse (score -> select -> gather) or,
// with more tokens in flight than the layer's sparse limit, every unit in the unit layout. The
// kernels are the ones the Python path calls one by one; doing the sequence here saves ~8 foreign
// calls per layer (Python glue was ~15 % of a decode step of the embedded model).
// Layouts and shapes are described by ArLayer / ArStep (step.h), mirrored by ctypes structures in
// adaroute/runtime/fused_cpu.py (field order and types must match).
#include "step.h"

extern "C" {

void ar_linear(const float* x, int64_t t_count, int64_t k, int nseg, const float* const* ws, const int64_t* rows,
               float* y, int64_t ldy, int accumulate, int nthreads);
void ar_gate_up_silu(const float* x, int64_t t_count, int64_t k, const float* wg, const float* wu, int64_t f, float* h,
                     int nthreads);
void ar_rmsnorm(const float* x, int64_t t_count, int64_t h, const float* w, float eps, float* out);
void ar_attention(const float* qkv, int64_t b_count, int64_t t_count, int64_t n_heads, int64_t n_kv, int64_t d,
                  float* k_cache, float* v_cache, int64_t s_max, int64_t pos, const int64_t* pad, const float* cos_t,
                  const float* sin_t, float* out, int nthreads);
void ar_routed_ffn(const float* x, int64_t t_count, int64_t h, int64_t f, const float* wg, const float* wu,
                   const float* wd_t, int64_t ldw, const uint8_t* shadow_q, const float* shadow_scale,
                   int64_t group_size, const float* unit_bias, float threshold, int64_t min_units, int64_t max_units,
                   int all_units, float* y, int64_t* counts, int accumulate, int nthreads, int64_t adapter_rank,
                   const float* a_in, const float* a_units, const float* a_out, int64_t* usage,
                   const uint8_t* shadow_g16);

struct ArLayer {
  const float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm;
  const float *w_gate, *w_up, *w_down;  // kind 0: w_down [H, F]; kind 1: w_down_t [F, H], rows ldw apart
  const uint8_t* shadow_q;
  const float *shadow_scale, *unit_bias;
  int64_t q_rows, kv_rows;              // Q*D and K*D
  int64_t units, ldw, group_size;
  int64_t kind;                         // 0 dense FFN, 1 routed FFN
  int64_t min_units, max_units;
  int64_t sparse_max_tokens;            // kind 1: sparse while at most this many tokens are in flight
  float threshold;
  int64_t band_lo, band_hi;             // kind 1, fail-safe on: units per token a selection may have
  int64_t fault;                        // injected fault of this step: 2 the sparse kernel throws, 3 NaN out
  const float *a_in, *a_units, *a_out;  // kind 1, routing adapter: [2r, H], [F, 3, r], [H, r] (sparse path only)
  int64_t adapter_rank;                 // 0: no adapter
  const uint8_t* shadow_g16;            // kind 1: the shadow in the g16 layout (null: rows only)
};

// Fail-safe of a sparse routed layer (step.h): the sparse kernel, then every unit for flagged tokens.
static void layer_failsafe(const ArLayer& ly, const ArStep* s, int64_t i, int64_t* counts) {
  const int64_t n = s->b * s->t, hd = s->hidden;
  routed_failsafe(
      s, i, ly.units, ly.band_lo, ly.band_hi, ly.fault, counts,
      [&](float* out, int64_t* c, int64_t* usage) {
        ar_routed_ffn(s->h, n, hd, ly.units, ly.w_gate, ly.w_up, ly.w_down, ly.ldw, ly.shadow_q, ly.shadow_scale,
                      ly.group_size, ly.unit_bias, ly.threshold, ly.min_units, ly.max_units, 0, out, c, 0,
                      s->nthreads, ly.adapter_rank, ly.a_in, ly.a_units, ly.a_out, usage, ly.shadow_g16);
      },
      [&](float* out, int64_t* c) {
        ar_routed_ffn(s->h, n, hd, ly.units, ly.w_gate, ly.w_up, ly.w_down, ly.ldw, ly.shadow_q, ly.shadow_scale,
                      ly.group_size, ly.unit_bias, ly.threshold, ly.min_units, ly.max_units, 1, out, c, 0,
                      s->nthreads, 0, nullptr, nullptr, nullptr, nullptr, nullptr);
      });
}

void ar_decode_layers(const ArLayer* layers, const ArStep* s) {
  const int64_t n = s->b * s->t, hd = s->hidden, th = s->nthreads;
  const int64_t cache_stride = s->layer_stride;
  for (int64_t i = 0; i < s->n_layers; ++i) {
    const ArLayer& ly = layers[i];
    int64_t* counts = s->counts + i * n;
    ar_rmsnorm(s->x, n, hd, ly.attn_norm, s->eps, s->h);
    const float* qkv_w[3] = {ly.wq, ly.wk, ly.wv};
    const int64_t qkv_rows[3] = {ly.q_rows, ly.kv_rows, ly.kv_rows};
    ar_linear(s->h, n, hd, 3, qkv_w, qkv_rows, s->qkv, ly.q_rows + 2 * ly.kv_rows, 0, th);
    ar_attention(s->qkv, s->b, s->t, s->n_heads, s->n_kv, s->head_dim, s->k_cache + i * cache_stride,
                 s->v_cache + i * cache_stride, s->s_max, s->pos, s->pad, s->cos, s->sin, s->attn, th);
    const float* o_w[1] = {ly.wo};
    const int64_t o_rows[1] = {hd};
    ar_linear(s->attn, n, ly.q_rows, 1, o_w, o_rows, s->x, hd, 1, th);
    ar_rmsnorm(s->x, n, hd, ly.mlp_norm, s->eps, s->h);
    std::fill(counts, counts + n, -1);
    if (ly.kind == 0) {
      ar_gate_up_silu(s->h, n, hd, ly.w_gate, ly.w_up, ly.units, s->hid, th);
      const float* d_w[1] = {ly.w_down};
      ar_linear(s->hid, n, ly.units, 1, d_w, o_rows, s->x, hd, 1, th);
      continue;
    }
    const bool every_unit = std::isinf(ly.threshold) && ly.threshold < 0 && ly.max_units >= ly.units;
    const bool sparse = n <= ly.sparse_max_tokens && !every_unit;
    if (sparse && s->failsafe) {
      layer_failsafe(ly, s, i, counts);
      continue;
    }
    ar_routed_ffn(s->h, n, hd, ly.units, ly.w_gate, ly.w_up, ly.w_down, ly.ldw, ly.shadow_q, ly.shadow_scale,
                  ly.group_size, ly.unit_bias, ly.threshold, ly.min_units, ly.max_units, sparse ? 0 : 1, s->x, counts,
                  1, th, ly.adapter_rank, ly.a_in, ly.a_units, ly.a_out, sparse ? usage_row(s, ly.units, i) : nullptr,
                  ly.shadow_g16);
    if (!sparse) std::fill(counts, counts + n, -1);
  }
}

}  // extern "C"
