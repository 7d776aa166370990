/* linquant: W4A16 linear on x86 CPUs with AVX512-BF16 (compiled on first use; see native.py).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] with w[n, k] = s[n, g] * u[n, k] + b[n, g], where u is the
 * unsigned 4-bit code (0..15), g = k / group and (s, b) are fp32 per (row, group).
 *
 * Weight layout (built by linquant.kernels.native.repack): row blocks of 16 output channels;
 * within a block, chunks of 4 consecutive k; one chunk is 32 bytes, byte j holding the codes of
 * row i = j / 2 at k + j % 2 (low nibble) and k + 2 + j % 2 (high nibble).
 *
 * Decoding: a code u becomes the bf16 number 128 + u by OR-ing it into the mantissa of 128.0
 * (0x4300): one zero-extension and two ternary-logic ops give 64 weights as bf16 pairs, and
 * vdpbf16ps multiplies them with a broadcast pair of activations, accumulating in fp32. Per
 * group, dot = sum x (128 + u), so sum x w = s * dot + (b - 128 s) * sum x, which is what the
 * epilogue applies with bo = b - 128 s and the group sums xs of the activations.
 *
 * The scale and offset come in one of two formats (group_params): fp32, or, when the scales are
 * exact in fp16 and the offset is an integer zero point, fp16 scales and uint8 128 + z (3
 * bytes instead of 8, the same result).
 *
 * Rows of x are processed in tiles of 8, 4, 2 or 1, so that each decoded chunk serves up to 8
 * rows; a row's group sum is split over 1, 2 or 4 accumulators by tile (CHAINS), so a row's
 * last bits may depend on how many rows came with it. Threads (OpenMP, PyTorch's own runtime)
 * split the row blocks. Results do not depend on the number of threads: each output is summed
 * in the same order by one thread. */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* Software prefetch distance in the codes: on 4096 x 4096 at 16 tokens it took 1.30 instead of
 * 1.47 ms (g128; 4 KiB ahead gained nothing more), one token unchanged. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif

static inline int32_t load_pair(const uint16_t* p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The per-group scale and offset of 16 rows: full format, fp32 s and bo = b - 128 s; compact
 * format (3 bytes instead of 8), fp16 s and uint8 c = 128 + z with bo = -(s * c), exact in
 * fp32. */
ALWAYS_INLINE void group_params(const void* sb, const void* ob, int64_t i, const int compact,
                                __m512* s, __m512* o)
{
    if (compact) {
        *s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)sb + i)));
        __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
            _mm_loadu_si128((const __m128i*)((const uint8_t*)ob + i))));
        *o = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(*s, c));
    } else {
        *s = _mm512_loadu_ps((const float*)sb + i);
        *o = _mm512_loadu_ps((const float*)ob + i);
    }
}

/* Independent accumulators per row: with one, the two vdpbf16ps of a chunk wait on each other
 * and a few rows are bound by the instruction's latency, not by its throughput or the memory
 * (4096 x 4096, g128, one token: 286 us with the weight in cache, 154 us with four). Eight
 * rows fill the pipeline by themselves, and 32 registers hold no more. */
#define CHAINS(MT) ((MT) <= 2 ? 4 : (MT) == 4 ? 2 : 1)

/* One chunk (64 codes) for MT rows of x: the low nibbles into acc[m][jl], the high into
 * acc[m][jh]. */
ALWAYS_INLINE void chunk(const uint8_t* q, const uint16_t* xc, int64_t K, const int MT,
                         __m512 acc[8][4], const int jl, const int jh)
{
    const __m512i mask = _mm512_set1_epi16(0x000F);
    const __m512i magic = _mm512_set1_epi16(0x4300);
    __m512i t = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)q));
    __m512i lo = _mm512_ternarylogic_epi32(t, mask, magic, 0xEA); /* (t & mask) | magic */
    __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(t, 4), mask, magic, 0xEA);
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++) {
        const uint16_t* xr = xc + m * K;
        __m512i x0 = _mm512_set1_epi32(load_pair(xr));
        __m512i x1 = _mm512_set1_epi32(load_pair(xr + 2));
        acc[m][jl] = _mm512_dpbf16_ps(acc[m][jl], (__m512bh)lo, (__m512bh)x0);
        acc[m][jh] = _mm512_dpbf16_ps(acc[m][jh], (__m512bh)hi, (__m512bh)x1);
    }
}

ALWAYS_INLINE void tile(const uint8_t* pb, const void* sb, const void* ob, const int compact,
                        const uint16_t* x, const float* xs, const float* bias, uint16_t* y,
                        int64_t m0, const int MT, int64_t N, int64_t K, int64_t g, int64_t b)
{
    const int64_t G = K / g, cpg = g / 4;
    const int CH = CHAINS(MT);
    __m512 yv[8];
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++) yv[m] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512 acc[8][4];
#pragma GCC unroll 8
        for (int m = 0; m < MT; m++)
#pragma GCC unroll 4
            for (int j = 0; j < CH; j++) acc[m][j] = _mm512_setzero_ps();
        const uint8_t* p = pb + gi * cpg * 32;
        const uint16_t* xg = x + m0 * K + gi * g;
        int64_t c = 0;
        if (CH == 4) {
            for (; c + 2 <= cpg; c += 2) { /* one prefetch per 64 bytes */
                _mm_prefetch((const char*)(p + c * 32 + PREFETCH_BYTES), _MM_HINT_T0);
                chunk(p + c * 32, xg + c * 4, K, MT, acc, 0, 1);
                chunk(p + c * 32 + 32, xg + c * 4 + 4, K, MT, acc, 2, 3);
            }
        }
        for (; c < cpg; c++) {
            _mm_prefetch((const char*)(p + c * 32 + PREFETCH_BYTES), _MM_HINT_T0);
            chunk(p + c * 32, xg + c * 4, K, MT, acc, 0, CH >= 2 ? 1 : 0);
        }
#pragma GCC unroll 8
        for (int m = 0; m < MT; m++) {
            if (CH == 4)
                acc[m][0] = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                          _mm512_add_ps(acc[m][2], acc[m][3]));
            else if (CH == 2)
                acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][1]);
        }
        __m512 s, o;
        group_params(sb, ob, gi * 16, compact, &s, &o);
#pragma GCC unroll 8
        for (int m = 0; m < MT; m++) {
            yv[m] = _mm512_fmadd_ps(s, acc[m][0], yv[m]);
            yv[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[(m0 + m) * G + gi]), yv[m]);
        }
    }
    const int64_t n0 = b * 16;
    const int64_t left = N - n0;
    const __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++) {
        __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(yv[m], bv)); /* round to nearest even */
        _mm256_mask_storeu_epi16(y + (m0 + m) * N + n0, keep, (__m256i)out);
    }
}

ALWAYS_INLINE void rows(const uint8_t* pb, const void* sbb, const void* obb, const int compact,
                        const uint16_t* x, const float* xs, const float* bias, uint16_t* y,
                        int64_t M, int64_t N, int64_t K, int64_t g, int64_t b)
{
    int64_t m0 = 0;
    while (m0 < M) {
        int64_t left = M - m0;
        if (left >= 8) { tile(pb, sbb, obb, compact, x, xs, bias, y, m0, 8, N, K, g, b); m0 += 8; }
        else if (left >= 4) { tile(pb, sbb, obb, compact, x, xs, bias, y, m0, 4, N, K, g, b); m0 += 4; }
        else if (left >= 2) { tile(pb, sbb, obb, compact, x, xs, bias, y, m0, 2, N, K, g, b); m0 += 2; }
        else { tile(pb, sbb, obb, compact, x, xs, bias, y, m0, 1, N, K, g, b); m0 += 1; }
    }
}

/* xs [M, K / g]: fp32 sums of each row's groups of x (written here). y [M, N] bf16 (written
 * here). bias: fp32 [N] or NULL. packed / sb / ob: the layout above, ceil(N / 16) blocks, in
 * the compact format when compact != 0 (see group_params). Returns the number of group sums
 * that are not finite; y is not computed when there are any. */
int64_t lq_w4a16_bf16(const uint8_t* packed, const void* sb, const void* ob, int64_t compact,
                      const uint16_t* x, float* xs, const float* bias, uint16_t* y,
                      int64_t M, int64_t N, int64_t K, int64_t g)
{
    const int64_t nb = (N + 15) / 16, G = K / g;
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t r = 0; r < M * G; r++) {
        const uint16_t* xr = x + (r / G) * K + (r % G) * g;
        float sum = 0.0f;
        for (int64_t k = 0; k < g; k++) {
            uint32_t bits = (uint32_t)xr[k] << 16;
            float v;
            memcpy(&v, &bits, sizeof v);
            sum += v;
        }
        xs[r] = sum;
        bad += !(sum - sum == 0.0f); /* Inf or NaN (not folded away: no -ffast-math) */
    }
    if (bad)
        return bad;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* pb = packed + b * (K / 4) * 32;
        if (compact)
            rows(pb, (const uint16_t*)sb + b * G * 16, (const uint8_t*)ob + b * G * 16, 1,
                 x, xs, bias, y, M, N, K, g, b);
        else
            rows(pb, (const float*)sb + b * G * 16, (const float*)ob + b * G * 16, 0,
                 x, xs, bias, y, M, N, K, g, b);
    }
    return 0;
}

/* The layout's codes from linquant's stored ones (see native.repack): src [N, K / 2] bytes,
 * code 2j of a row in the low nibble of byte j and 2j + 1 in the high (symmetric codes in two's
 * complement, made unsigned, c + 8, by flipping each code's top bit); dst [ceil(N / 16), K / 4,
 * 32] as described at the top, rows past N zero. Bytes 2c and 2c + 1 of a row (codes 4c to
 * 4c + 3) give its two bytes of chunk c: (u0 | u2 << 4) and (u1 | u3 << 4). K % 4 == 0. */
int64_t lq_w4a16_repack(const uint8_t* src, uint8_t* dst, int64_t N, int64_t K, int64_t sym)
{
    const int64_t nb = (N + 15) / 16, C = K / 4;
    const uint8_t flip = sym ? 0x88 : 0x00;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 20))
    for (int64_t b = 0; b < nb; b++) {
        uint8_t* out = dst + b * C * 32;
        for (int i = 0; i < 16; i++) {
            const int64_t row = b * 16 + i;
            if (row >= N) {
                for (int64_t c = 0; c < C; c++)
                    out[c * 32 + 2 * i] = out[c * 32 + 2 * i + 1] = 0;
                continue;
            }
            const uint8_t* r = src + row * (K / 2);
            for (int64_t c = 0; c < C; c++) {
                const uint8_t b0 = r[2 * c] ^ flip, b1 = r[2 * c + 1] ^ flip;
                out[c * 32 + 2 * i] = (uint8_t)((b0 & 0x0F) | (b1 << 4));
                out[c * 32 + 2 * i + 1] = (uint8_t)((b0 >> 4) | (b1 & 0xF0));
            }
        }
    }
    return 0;
}
