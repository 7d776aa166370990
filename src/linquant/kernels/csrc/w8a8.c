/* linquant: W8A8 linear (int8 activations x int8 weights, int32 sums) on x86 CPUs with
 * AVX512-VNNI (compiled on first use; see native.py); also W8A16 (lq_w8a16: each bf16 / fp16
 * activation split into two int8 digits, both through the same GEMM). Bit-identical to
 * linquant.kernels.reference.linear_w8a8: the same activation codes (same float operations in
 * the same order), exact int32 products, the same fp32 rescale order. Compile with
 * -ffp-contract=off: a fused multiply-add would round differently from the reference.
 *
 * Activations are quantized here (one pass per token) to unsigned codes a = c + 128 (symmetric:
 * zero point 128) or to the static asymmetric codes a with their zero point z; vpdpbusd
 * multiplies them with the signed weights, and z * sum_k w[n, k] is subtracted in int32.
 *
 * Weight layout (built by linquant.kernels.native.repack_w8a8): row blocks of 16 output
 * channels; within a block, chunks of 4 consecutive k (K padded with zeros to a multiple of 4),
 * 64 bytes each, byte 4 i + j holding w[16 b + i, 4 c + j]. Rows of x are processed in tiles of
 * up to 8, so each 64-byte chunk serves 8 tokens; threads (OpenMP) split the row blocks. */
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

/* max |x| over a token into *amax; returns 1 when the token holds Inf or NaN. */
static int token_amax(const float* xr, int64_t K, float* amax_out)
{
    __m512 mx = _mm512_setzero_ps();
    __m512 fin = _mm512_setzero_ps(); /* x - x: 0 for finite x, NaN otherwise */
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(xr + k);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        fin = _mm512_add_ps(fin, _mm512_sub_ps(v, v));
    }
    float amax = _mm512_reduce_max_ps(mx);
    float f = _mm512_reduce_add_ps(fin);
    for (; k < K; k++) {
        float v = fabsf(xr[k]);
        amax = v > amax ? v : amax;
        f += xr[k] - xr[k];
    }
    *amax_out = amax;
    return f != 0.0f || f != f;
}

/* Dynamic per-token codes: s = max(max|x| / 127, FLT_MIN), c = round_half_even(x / s), which lies
 * in [-127, 127] for finite x. Returns 1 when the token holds Inf or NaN (not quantized). */
static int quantize_token(const float* xr, int64_t K, int64_t Kp, uint8_t* ar, float* s_out)
{
    float amax;
    if (token_amax(xr, K, &amax))
        return 1;
    int64_t k;
    float s = amax / QMAX;
    if (s < FLT_MIN)
        s = FLT_MIN;
    *s_out = s;
    const __m512 sv = _mm512_set1_ps(s);
    const __m512i off = _mm512_set1_epi32(128);
    for (k = 0; k + 16 <= K; k += 16) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xr + k), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(q), off);
        _mm_storeu_si128((__m128i*)(ar + k), _mm512_cvtepi32_epi8(c));
    }
    for (; k < K; k++)
        ar[k] = (uint8_t)((int)nearbyintf(xr[k] / s) + 128);
    for (; k < Kp; k++)
        ar[k] = 128;
    return 0;
}

/* Static codes with one scale s: t = round_half_even(x / s), NaN -> 0, then symmetric
 * clamp(t, -127, 127) + 128, or asymmetric clamp(t + z, 0, 255). */
static void quantize_static(const float* xr, int64_t K, int64_t Kp, uint8_t* ar, float s,
                            int64_t z)
{
    const float lo = z < 0 ? -QMAX : 0.0f, hi = z < 0 ? QMAX : 255.0f;
    const float add = z < 0 ? 0.0f : (float)z, shift = z < 0 ? 128.0f : 0.0f;
    const __m512 sv = _mm512_set1_ps(s), addv = _mm512_set1_ps(add);
    const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi), shv = _mm512_set1_ps(shift);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 t = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xr + k), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q), _mm512_setzero_ps());
        t = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(t, addv), lov), hiv);
        __m512i c = _mm512_cvtps_epi32(_mm512_add_ps(t, shv));
        _mm_storeu_si128((__m128i*)(ar + k), _mm512_cvtepi32_epi8(c));
    }
    for (; k < K; k++) {
        float t = nearbyintf(xr[k] / s);
        if (t != t)
            t = 0.0f;
        t += add;
        t = t < lo ? lo : (t > hi ? hi : t);
        ar[k] = (uint8_t)(int)(t + shift);
    }
    for (; k < Kp; k++)
        ar[k] = (uint8_t)(z < 0 ? 128 : z);
}

ALWAYS_INLINE void tile(const int8_t* pb, const int32_t* zsum, const float* scale_n,
                        const float* bias, const uint8_t* a, const float* as, float* y,
                        int64_t m0, const int MT, int64_t N, int64_t Kp, int64_t b,
                        const int pairs)
{
    __m512i acc[8];
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++)
        acc[m] = _mm512_setzero_si512();
    const int64_t nq = Kp / 4;
    for (int64_t c = 0; c < nq; c++) {
        _mm_prefetch((const char*)(pb + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512((const void*)(pb + c * 64));
#pragma GCC unroll 8
        for (int m = 0; m < MT; m++) {
            int32_t v;
            memcpy(&v, a + (m0 + m) * Kp + c * 4, sizeof v);
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(v), w);
        }
    }
    const int64_t n0 = b * 16, left = N - n0;
    const __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    const __m512i zs = _mm512_loadu_si512((const void*)(zsum + n0));
    const __m512 sn = _mm512_maskz_loadu_ps(keep, scale_n + n0);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
    if (pairs) { /* W8A16: rows 2 j and 2 j + 1 hold the two digits of token m0 / 2 + j */
        const __m512 r = _mm512_set1_ps(1.0f / 128.0f);
#pragma GCC unroll 4
        for (int j = 0; j < MT / 2; j++) {
            __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * j], zs));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * j + 1], zs));
            __m512 f = _mm512_add_ps(hi, _mm512_mul_ps(lo, r));
            const int64_t t = m0 / 2 + j;
            f = _mm512_mul_ps(_mm512_mul_ps(f, _mm512_set1_ps(as[t])), sn);
            if (bias)
                f = _mm512_add_ps(f, bv);
            _mm512_mask_storeu_ps(y + t * N + n0, keep, f);
        }
        return;
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], zs));
        if (as) /* dynamic: (acc * s_token) * w_scale */
            f = _mm512_mul_ps(_mm512_mul_ps(f, _mm512_set1_ps(as[m0 + m])), sn);
        else /* static: acc * (s * w_scale), the product passed in scale_n */
            f = _mm512_mul_ps(f, sn);
        if (bias)
            f = _mm512_add_ps(f, bv);
        _mm512_mask_storeu_ps(y + (m0 + m) * N + n0, keep, f);
    }
}

/* The GEMM over M rows of codes a [M, Kp] (pairs: M even, rows paired as W8A16 digits).
 * The rows are taken in chunks of about CHUNK_BYTES of codes (a multiple of 8 rows): each
 * thread runs its row blocks over one chunk, then the next, so a chunk is read from memory
 * once and then from the thread's L2 for every row block, instead of all M rows streamed
 * again for each row block (once the codes outgrow L2: K = 4096 from about 256 tokens). The
 * weight blocks are read once per chunk. Every thread gets the same row blocks in every
 * chunk (static schedule), and the tiles are those of one pass, so results do not change. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (1024 * 1024)
#endif

static void gemm(const int8_t* packed, const int32_t* zsum, const float* scale_n,
                 const float* bias, const uint8_t* a, const float* as, float* y, int64_t M,
                 int64_t N, int64_t Kp, const int pairs)
{
    const int64_t nb = (N + 15) / 16;
    int64_t mc = CHUNK_BYTES > 0 ? ((int64_t)CHUNK_BYTES / Kp) & ~(int64_t)7 : M;
    if (mc < 8)
        mc = 8;
#pragma omp parallel
    for (int64_t c0 = 0; c0 < M; c0 += mc) {
        const int64_t c1 = M - c0 > mc ? c0 + mc : M;
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < nb; b++) {
            const int8_t* pb = packed + b * (Kp / 4) * 64;
            int64_t m0 = c0;
            while (m0 < c1) {
                const int64_t left = c1 - m0;
                const int mt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                if (mt == 8)
                    tile(pb, zsum, scale_n, bias, a, as, y, m0, 8, N, Kp, b, pairs);
                else if (mt == 4)
                    tile(pb, zsum, scale_n, bias, a, as, y, m0, 4, N, Kp, b, pairs);
                else if (mt == 2)
                    tile(pb, zsum, scale_n, bias, a, as, y, m0, 2, N, Kp, b, pairs);
                else
                    tile(pb, zsum, scale_n, bias, a, as, y, m0, 1, N, Kp, b, pairs);
                m0 += mt;
            }
        }
    }
}

/* x [M, K] fp32; a [M, Kp] and as [M] are scratch; y [M, N] fp32 (written here).
 * colsum [ceil(N / 16) * 16]: sum_k w[n, k] (int32). scale_n [N]: the weight scales (dynamic)
 * or act_scale * weight scales (static). static_scale <= 0: dynamic per-token activations;
 * else static with that scale and zero point z (z < 0: symmetric). Returns the number of
 * dynamic tokens holding Inf or NaN; y is not computed when there are any. */
int64_t lq_w8a8(const int8_t* packed, const int32_t* colsum, const float* scale_n,
                const float* bias, const float* x, uint8_t* a, float* as, int32_t* zsum,
                float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, float static_scale,
                int64_t z)
{
    const int dynamic = !(static_scale > 0.0f);
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++) {
        if (dynamic)
            bad += quantize_token(x + m * K, K, Kp, a + m * Kp, as + m);
        else
            quantize_static(x + m * K, K, Kp, a + m * Kp, static_scale, z);
    }
    if (bad)
        return bad;
    const int64_t nb = (N + 15) / 16;
    const int32_t zp = dynamic || z < 0 ? 128 : (int32_t)z;
    for (int64_t n = 0; n < nb * 16; n++)
        zsum[n] = zp * colsum[n];
    gemm(packed, zsum, scale_n, bias, a, dynamic ? as : NULL, y, M, N, Kp, 0);
    return 0;
}

/* Digits of one token for W8A16: with 2^p the smallest power of two such that
 * max|x| <= 127 * 2^p (p >= -100), t = x * 2^-p (exact), d1 = round_half_even(t) in [-127, 127]
 * and d2 = round_half_even(128 * (t - d1)) in [-64, 64], stored as d + 128. Returns 1 when the
 * token holds Inf or NaN. */
static int digits_token(const float* xr, int64_t K, int64_t Kp, uint8_t* hi, uint8_t* lo,
                        float* scale)
{
    float amax;
    if (token_amax(xr, K, &amax))
        return 1;
    int64_t k;
    int p;
    frexpf(amax / QMAX, &p); /* amax / 127 <= 2^p; frexp(0) gives p = 0 */
    if (p < -100)
        p = -100;
    *scale = ldexpf(1.0f, p);
    const __m512 inv = _mm512_set1_ps(ldexpf(1.0f, -p)), r = _mm512_set1_ps(128.0f);
    const __m512i off = _mm512_set1_epi32(128);
    for (k = 0; k + 16 <= K; k += 16) {
        __m512 t = _mm512_mul_ps(_mm512_loadu_ps(xr + k), inv);
        __m512 d1 = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 d2 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, d1), r),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i*)(hi + k),
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(d1), off)));
        _mm_storeu_si128((__m128i*)(lo + k),
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(d2), off)));
    }
    const float invs = ldexpf(1.0f, -p);
    for (; k < K; k++) {
        float t = xr[k] * invs, d1 = nearbyintf(t);
        hi[k] = (uint8_t)((int)d1 + 128);
        lo[k] = (uint8_t)((int)nearbyintf((t - d1) * 128.0f) + 128);
    }
    for (; k < Kp; k++)
        hi[k] = lo[k] = 128;
    return 0;
}

/* W8A16: bf16 / fp16 activations (passed as fp32 x [M, K]) times int8 weights with scales
 * scale_n [N]: each token split into two int8 digits (digits_token), both digit rows through the
 * int8 GEMM, y = scale_n * 2^p * (acc1 + acc2 / 128) (+ bias), fp32 [M, N]. a [2 M, Kp] and
 * pw [M] are scratch. Returns the number of tokens holding Inf or NaN (y not computed then). */
int64_t lq_w8a16(const int8_t* packed, const int32_t* colsum, const float* scale_n,
                 const float* bias, const float* x, uint8_t* a, float* pw, int32_t* zsum,
                 float* y, int64_t M, int64_t N, int64_t K, int64_t Kp)
{
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++)
        bad += digits_token(x + m * K, K, Kp, a + 2 * m * Kp, a + (2 * m + 1) * Kp, pw + m);
    if (bad)
        return bad;
    const int64_t nb = (N + 15) / 16;
    for (int64_t n = 0; n < nb * 16; n++)
        zsum[n] = 128 * colsum[n];
    gemm(packed, zsum, scale_n, bias, a, pw, y, 2 * M, N, Kp, 1);
    return 0;
}
