/* linquant: W8A8 linear (int8 activations x int8 weights, int32 sums) on x86 CPUs with AVX2
 * only (compiled on first use; see native.py): the same entry point, arguments, weight layout
 * and results as lq_w8a8 in w8a8.c (AVX512-VNNI), bit-identical to
 * linquant.kernels.reference.linear_w8a8. Compile with -ffp-contract=off.
 *
 * Without VNNI the int8 product is vpmaddubsw (u8 x s8, adjacent pairs summed into int16 with
 * saturation) and vpmaddwd (int16 pairs into int32). To keep every sum exact, the weight is
 * split into |w| (the u8 operand; |-128| = 128) and its sign, moved onto the activation code
 * d = a - 128 (signed: the dynamic / static symmetric code c, in [-127, 127], so negating it
 * cannot overflow) by vpsignb: |w| * sign(w) d = d w, and a pair sum is at most
 * 2 * 128 * 127 = 32512 < 32767, for any int8 weight. Static asymmetric codes reach
 * d = a - 128 = -128, which vpsignb cannot negate: they take an int16 form (tile16). The
 * activation codes are stored as d (w8a8.c stores a). The int32 sums are
 * sum_k d w = sum_k a w - 128 colsum; the caller's zero point z enters as
 * zsum = (z - 128) colsum, subtracted as in w8a8.c.
 *
 * Weight layout (linquant.kernels.native.repack_w8a8, shared with w8a8.c): row blocks of 16
 * output channels; within a block, chunks of 4 consecutive k (K padded with zeros to a multiple
 * of 4), 64 bytes each, byte 4 i + j holding w[16 b + i, 4 c + j]: here two 32-byte halves,
 * channels 0-7 and 8-15 of the block, one int32 lane per channel after vpmaddwd. Rows of x are
 * processed in tiles of up to 4, so each chunk serves 4 tokens; threads (OpenMP) split the row
 * blocks. */
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

static const float QMAX = 127.0f;

static float hmax8(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static float hadd8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* max |x| over a token into *amax; returns 1 when the token holds Inf or NaN. */
static int token_amax(const float* xr, int64_t K, float* amax_out)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 mx = _mm256_setzero_ps();
    __m256 fin = _mm256_setzero_ps(); /* x - x: 0 for finite x, NaN otherwise */
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(xr + k);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
        fin = _mm256_add_ps(fin, _mm256_sub_ps(v, v));
    }
    float amax = hmax8(mx);
    float f = hadd8(fin);
    for (; k < K; k++) {
        float v = fabsf(xr[k]);
        amax = v > amax ? v : amax;
        f += xr[k] - xr[k];
    }
    *amax_out = amax;
    return f != 0.0f || f != f;
}

/* 8 int32 codes (each in [-127, 127]) into 8 signed bytes */
ALWAYS_INLINE void store8s(int8_t* dst, __m256i c)
{
    __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    __m128i w = _mm_packs_epi32(lo, hi);               /* 8 x s16 */
    _mm_storel_epi64((__m128i*)dst, _mm_packs_epi16(w, w)); /* 8 x s8 */
}

/* Dynamic per-token codes, as w8a8.c: s = max(max|x| / 127, FLT_MIN), c = round_half_even(x / s),
 * stored as d = c (w8a8.c stores a = c + 128; here the GEMM reads d = a - 128 directly, which
 * saves one instruction per token and chunk). Returns 1 when the token holds Inf or NaN (not
 * quantized). */
static int quantize_token(const float* xr, int64_t K, int64_t Kp, int8_t* dr, float* s_out)
{
    float amax;
    if (token_amax(xr, K, &amax))
        return 1;
    int64_t k;
    float s = amax / QMAX;
    if (s < FLT_MIN)
        s = FLT_MIN;
    *s_out = s;
    const __m256 sv = _mm256_set1_ps(s);
    for (k = 0; k + 8 <= K; k += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), sv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        store8s(dr + k, _mm256_cvtps_epi32(q));
    }
    for (; k < K; k++)
        dr[k] = (int8_t)(int)nearbyintf(xr[k] / s);
    for (; k < Kp; k++)
        dr[k] = 0;
    return 0;
}

/* Static codes with one scale s, as w8a8.c: t = round_half_even(x / s), NaN -> 0, then
 * symmetric clamp(t, -127, 127) or asymmetric clamp(t + z, 0, 255), stored as d = a - 128 where
 * w8a8.c stores a: symmetric d = t in int8 (dr), asymmetric d in int16 (d16, for tile16). */
static void quantize_static(const float* xr, int64_t K, int64_t Kp, int8_t* dr, int16_t* d16,
                            float s, int64_t z)
{
    const float lo = z < 0 ? -QMAX : 0.0f, hi = z < 0 ? QMAX : 255.0f;
    const float add = z < 0 ? 0.0f : (float)z, shift = z < 0 ? 0.0f : -128.0f;
    const __m256 sv = _mm256_set1_ps(s), addv = _mm256_set1_ps(add);
    const __m256 lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi), shv = _mm256_set1_ps(shift);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 t = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), sv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        t = _mm256_blendv_ps(t, _mm256_setzero_ps(), _mm256_cmp_ps(t, t, _CMP_UNORD_Q));
        t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, addv), lov), hiv);
        const __m256i c = _mm256_cvtps_epi32(_mm256_add_ps(t, shv));
        if (z < 0)
            store8s(dr + k, c);
        else
            _mm_storeu_si128((__m128i*)(d16 + k), _mm_packs_epi32(_mm256_castsi256_si128(c),
                                                                  _mm256_extracti128_si256(c, 1)));
    }
    for (; k < K; k++) {
        float t = nearbyintf(xr[k] / s);
        if (t != t)
            t = 0.0f;
        t += add;
        t = t < lo ? lo : (t > hi ? hi : t);
        const int d = (int)(t + shift);
        if (z < 0)
            dr[k] = (int8_t)d;
        else
            d16[k] = (int16_t)d;
    }
    for (; k < Kp; k++) {
        if (z < 0)
            dr[k] = 0;
        else
            d16[k] = (int16_t)(z - 128);
    }
}

/* sum over one 4-k chunk of d * w for 8 channels: |w| (u8; |-128| = 128) times sign(w) d (s8:
 * |d| <= 127, so negating it cannot overflow, where negating w = -128 would), pairs into int16
 * (exact: at most 2 * 128 * 127 = 32512), then pairs into int32 */
ALWAYS_INLINE __m256i dot4(__m256i w, __m256i wabs, __m256i d, __m256i ones)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(d, w)), ones);
}

/* The epilogue of a tile, shared by both forms: a block's zsum, weight scales and bias (16
 * channels, zero past N) ... */
typedef struct {
    float sn[16], bv[16];
    __m256i zs[2];
    int64_t n0, left;
} Block;

ALWAYS_INLINE void block_init(Block* blk, const int32_t* zsum, const float* scale_n,
                              const float* bias, int64_t N, int64_t b)
{
    blk->n0 = b * 16;
    blk->left = N - blk->n0;
    blk->zs[0] = _mm256_loadu_si256((const __m256i*)(zsum + blk->n0));
    blk->zs[1] = _mm256_loadu_si256((const __m256i*)(zsum + blk->n0 + 8));
    for (int i = 0; i < 16; i++) {
        blk->sn[i] = i < blk->left ? scale_n[blk->n0 + i] : 0.0f;
        blk->bv[i] = (bias && i < blk->left) ? bias[blk->n0 + i] : 0.0f;
    }
}

/* ... and one token's row: int32 sums s[2] (channels 0-7, 8-15) minus zsum, times the token's
 * scale ts (dynamic: (acc * s_token) * w_scale; ts < 0: static, acc * (s * w_scale), the product
 * passed in scale_n), plus the bias, stored to yr[n0 .. n0 + min(16, left)). */
ALWAYS_INLINE void block_store(const Block* blk, const __m256i s[2], float ts, int has_bias,
                               float* yr)
{
    float out[16];
    for (int h = 0; h < 2; h++) {
        __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(s[h], blk->zs[h]));
        const __m256 snv = _mm256_loadu_ps(blk->sn + 8 * h);
        if (ts >= 0.0f)
            f = _mm256_mul_ps(_mm256_mul_ps(f, _mm256_set1_ps(ts)), snv);
        else
            f = _mm256_mul_ps(f, snv);
        if (has_bias)
            f = _mm256_add_ps(f, _mm256_loadu_ps(blk->bv + 8 * h));
        _mm256_storeu_ps(out + 8 * h, f);
    }
    memcpy(yr + blk->n0, out, (size_t)(blk->left >= 16 ? 16 : blk->left) * sizeof(float));
}

ALWAYS_INLINE void tile(const int8_t* pb, const int32_t* zsum, const float* scale_n,
                        const float* bias, const int8_t* d8, const float* as, float* y,
                        int64_t m0, const int MT, int64_t N, int64_t Kp, int64_t b)
{
    __m256i acc[4][2];
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t nq = Kp / 4;
    for (int64_t c = 0; c < nq; c++) {
        _mm_prefetch((const char*)(pb + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)(pb + c * 64));
        const __m256i w1 = _mm256_loadu_si256((const __m256i*)(pb + c * 64 + 32));
        const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 4
        for (int m = 0; m < MT; m++) {
            int32_t v;
            memcpy(&v, d8 + (m0 + m) * Kp + c * 4, sizeof v);
            const __m256i d = _mm256_set1_epi32(v);
            acc[m][0] = _mm256_add_epi32(acc[m][0], dot4(w0, a0, d, ones));
            acc[m][1] = _mm256_add_epi32(acc[m][1], dot4(w1, a1, d, ones));
        }
    }
    Block blk;
    block_init(&blk, zsum, scale_n, bias, N, b);
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
        block_store(&blk, acc[m], as ? as[m0 + m] : -1.0f, bias != NULL, y + (m0 + m) * N);
}

static void gemm(const int8_t* packed, const int32_t* zsum, const float* scale_n,
                 const float* bias, const int8_t* d8, const float* as, float* y, int64_t M,
                 int64_t N, int64_t Kp)
{
    const int64_t nb = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const int8_t* pb = packed + b * (Kp / 4) * 64;
        int64_t m0 = 0;
        while (m0 < M) {
            int64_t left = M - m0;
            if (left >= 4) { tile(pb, zsum, scale_n, bias, d8, as, y, m0, 4, N, Kp, b); m0 += 4; }
            else if (left >= 2) { tile(pb, zsum, scale_n, bias, d8, as, y, m0, 2, N, Kp, b); m0 += 2; }
            else { tile(pb, zsum, scale_n, bias, d8, as, y, m0, 1, N, Kp, b); m0 += 1; }
        }
    }
}

/* Static asymmetric codes: d = a - 128 reaches -128, which vpsignb cannot negate, so these go
 * through int16 instead: each 16-byte quarter of a chunk (4 channels x 4 k) sign-extended to
 * int16, times the 4 codes d as int16 (one 64-bit broadcast), by vpmaddwd: exact for any
 * codes, int32 lanes holding (k0 + k1) and (k2 + k3) of each channel, added pairwise at the
 * end. Timed alternately with the vpmaddubsw form on cold 4096 x 4096 weights (1, 16 and 256
 * tokens): 0.96-1.04x its speed. d16 [M, Kp]: the codes as int16. */
ALWAYS_INLINE void tile16(const int8_t* pb, const int32_t* zsum, const float* scale_n,
                          const float* bias, const int16_t* d16, float* y, int64_t m0,
                          const int MT, int64_t N, int64_t Kp, int64_t b)
{
    __m256i acc[2][4];
#pragma GCC unroll 2
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < 4; j++)
            acc[m][j] = _mm256_setzero_si256();
    const int64_t nq = Kp / 4;
    for (int64_t c = 0; c < nq; c++) {
        _mm_prefetch((const char*)(pb + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        __m256i w[4];
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(pb + c * 64 + 16 * j)));
#pragma GCC unroll 2
        for (int m = 0; m < MT; m++) {
            int64_t v;
            memcpy(&v, d16 + (m0 + m) * Kp + c * 4, sizeof v);
            const __m256i dv = _mm256_set1_epi64x(v);
            for (int j = 0; j < 4; j++)
                acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(w[j], dv));
        }
    }
    Block blk;
    block_init(&blk, zsum, scale_n, bias, N, b);
    for (int m = 0; m < MT; m++) {
        /* hadd: [c0, c1, c4, c5 | c2, c3, c6, c7] of 8 channels; 0xD8 puts them in order */
        const __m256i sums[2] = {
            _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][0], acc[m][1]), 0xD8),
            _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][2], acc[m][3]), 0xD8)};
        block_store(&blk, sums, -1.0f, bias != NULL, y + (m0 + m) * N); /* static scales */
    }
}

static void gemm16(const int8_t* packed, const int32_t* zsum, const float* scale_n,
                   const float* bias, const int16_t* d16, float* y, int64_t M, int64_t N,
                   int64_t Kp)
{
    const int64_t nb = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const int8_t* pb = packed + b * (Kp / 4) * 64;
        int64_t m0 = 0;
        while (m0 < M) {
            if (M - m0 >= 2) { tile16(pb, zsum, scale_n, bias, d16, y, m0, 2, N, Kp, b); m0 += 2; }
            else { tile16(pb, zsum, scale_n, bias, d16, y, m0, 1, N, Kp, b); m0 += 1; }
        }
    }
}

/* As lq_w8a8 in w8a8.c: the same arguments and results, except that a must hold
 * 2 * M * Kp + 64 bytes, and holds the codes d = a - 128 of w8a8.c's a: int8, or for static
 * asymmetric activations int16 from the first 64-byte boundary. Returns the number of dynamic
 * tokens holding Inf or NaN (y not computed when there are any). */
int64_t lq_w8a8(const int8_t* packed, const int32_t* colsum, const float* scale_n,
                const float* bias, const float* x, uint8_t* a, float* as, int32_t* zsum,
                float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, float static_scale,
                int64_t z)
{
    const int dynamic = !(static_scale > 0.0f);
    int8_t* d8 = (int8_t*)a;
    int16_t* d16 = (int16_t*)(((uintptr_t)a + 63) & ~(uintptr_t)63);
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++) {
        if (dynamic)
            bad += quantize_token(x + m * K, K, Kp, d8 + m * Kp, as + m);
        else
            quantize_static(x + m * K, K, Kp, d8 + m * Kp, d16 + m * Kp, static_scale, z);
    }
    if (bad)
        return bad;
    /* the GEMMs sum d w with d = a - 128: sum (a - zp) w = sum d w - (zp - 128) colsum */
    const int64_t nb = (N + 15) / 16;
    const int32_t zp = dynamic || z < 0 ? 128 : (int32_t)z;
    for (int64_t n = 0; n < nb * 16; n++)
        zsum[n] = (zp - 128) * colsum[n];
    if (!dynamic && z >= 0) {
        gemm16(packed, zsum, scale_n, bias, d16, y, M, N, Kp);
        return 0;
    }
    gemm(packed, zsum, scale_n, bias, d8, dynamic ? as : NULL, y, M, N, Kp);
    return 0;
}
