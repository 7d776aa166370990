/* linquant: weight-only linear (4- or 8-bit codes, half-precision activations) on x86 CPUs with
 * AVX2 and FMA (compiled on first use; see native.py). For CPUs without AVX-512: Intel Haswell
 * to Raptor Lake client parts, AMD Zen 1-3.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] with w[n, k] = s[n, g] * u[n, k] + o[n, g], where u is the
 * unsigned code (0 .. 2^bits - 1), g = k / group and (s, o) are fp32 per (row, group) (stored
 * as s, a center code c and the centered offset o + c s: see group_params).
 *
 * Weight layout (built by linquant.kernels.native.repack_avx2): row blocks of 8 output channels;
 * within a block, one 32-bit word per row and per P = 32 / bits consecutive k, the 8 words of a
 * block side by side (one AVX2 vector); code j of a word (k = P * w + j) in bits
 * [bits * j, bits * (j + 1)).
 *
 * Decoding: code j of 8 words is (W & mask_j) = u * 2^(bits j), converted to fp32 exactly by
 * vcvtdq2ps (the last code, shifted down instead, so that the sign bit stays clear). The factor
 * 2^(bits j) is folded into the activation: prepare_token writes x * 2^-(bits j) (times a
 * per-token power of two that brings the token's largest element into [1, 2), so that nothing
 * underflows; exact). Per 8 weights one AND and one conversion, shared by the tokens of a tile,
 * then one FMA per token; the products x u are exact in fp32 (8 + 8 bits at most) and summed in
 * fp32 per group, then y = 2^p (sum_g s dot_g + o xs_g) + bias with xs_g the group sums of the
 * scaled activations. fp32 activations take centered codes u - c instead (c: the code of the
 * row and group nearest to w = 0, exact in fp32), so that sums of x (u - c) follow sums of
 * x w: with u's sums, a weight whose zero sits far from mid-range (an outlier on one side)
 * summed a large multiple of sum x that the offset term then cancelled, losing fp32 digits
 * (5.6e-5 of the largest output against the reference at K = 1024, now ~1e-6).
 *
 * Rows of x are processed in tiles of 8, 4, 2 or 1 (MAXT: the largest), each token's group sum
 * split over 1, 2, 4 or 8 registers: 8 independent FMA chains hide the FMA latency, and with
 * the word, the decoded vector and a broadcast that is 11 of AVX2's 16 registers (the tile of
 * 8's running totals, 8 more, do not fit; they are updated once per group). The tile of 8
 * decodes each word once for twice the tokens of the tile of 4: about 1.1x faster from 8
 * tokens on (BENCHMARKS.md). The prepared activations' rows are ldx >= K floats apart
 * (native.py: K + 16), so that the tile's 8 rows do not share L1 sets when 4 K is a multiple
 * of 4 KiB (at K = 4096 the tile of 8 ran 0.91x the tile of 4 without it). Threads (OpenMP)
 * split the row blocks; results do not depend on the number of threads. A token's result
 * depends on its tile (the summation order differs), not on the other tokens' values. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#ifndef MAXT /* the largest tile: 8, or 4 as before it (-DMAXT=4, for benchmarks) */
#define MAXT 8
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

/* The per-group parameters of a block of 8 rows, by format (fmt):
 *   FMT_OFFSET  (float offsets): sb fp32 scales; ob records of 8 fp32 centered offsets o_c,
 *               then their 8 uint8 center codes c (one record, one memory stream);
 *   FMT_COMPACT (scales exact in fp16, integer zero points): sb fp16 scales, ob uint8 zero
 *               points z, which are the centers (o_c = 0);
 *   FMT_CENTER  (fp32 scales, integer zero points or symmetric codes): sb fp32 scales, ob uint8
 *               centers (the zero points, or 2^(bits - 1)), o_c = 0.
 * The last two carry no offsets: 3 and 5 bytes per row and group, 9 for FMT_OFFSET. */
#define FMT_OFFSET 0
#define FMT_COMPACT 1
#define FMT_CENTER 2
#define OREC(fmt) ((fmt) == FMT_OFFSET ? 40 : 8) /* bytes of ob per group of 8 rows */

/* The center codes c of 8 rows for group gi. */
ALWAYS_INLINE __m256 centers(const void* ob, int64_t gi, const int fmt)
{
    const uint8_t* cb = (const uint8_t*)ob + gi * OREC(fmt) + (fmt == FMT_OFFSET ? 32 : 0);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)cb)));
}

/* The per-group scale and offset of 8 rows, with w = s u + o (center: w = s (u - c) + o_c, the
 * offset for centered codes): o_c as stored (FMT_OFFSET: o + c s, rounded once from fp64, at
 * most s / 2) or 0; uncentered (16-bit activations), o = o_c - c s, rounded once (exact for
 * FMT_COMPACT: 11 + 8 significant bits). */
ALWAYS_INLINE void group_params(const void* sb, const void* ob, __m256 c, int64_t gi,
                                const int fmt, const int center, __m256* s, __m256* o)
{
    if (fmt == FMT_COMPACT)
        *s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)sb + gi * 8)));
    else
        *s = _mm256_loadu_ps((const float*)sb + gi * 8);
    if (fmt == FMT_OFFSET) {
        *o = _mm256_loadu_ps((const float*)((const char*)ob + gi * OREC(fmt)));
        if (!center)
            *o = _mm256_fnmadd_ps(c, *s, *o);
    } else {
        *o = center ? _mm256_setzero_ps() : _mm256_sub_ps(_mm256_setzero_ps(),
                                                          _mm256_mul_ps(*s, c));
    }
}

/* Code j of 8 words as fp32 times 2^(bits j) (the last code: times 1); center: minus cj, the
 * rows' center codes c times the same power of two (exact: (u - c) 2^(bits j) has at most
 * bits + 1 significant bits). A subtraction of a vector made once per group, not an FMA: the
 * FMA units are the ones the tile's products keep busy (an FMA here cost 5-8% at 16-64 tokens
 * with 8-bit codes). */
ALWAYS_INLINE __m256 decode(__m256i w, const int bits, const int j, const int center, __m256 cj)
{
    const int P = 32 / bits;
    __m256i u;
    if (j == P - 1)
        u = _mm256_srli_epi32(w, 32 - bits);
    else
        u = _mm256_and_si256(w, _mm256_set1_epi32((int)(((1u << bits) - 1u) << (bits * j))));
    __m256 f = _mm256_cvtepi32_ps(u);
    return center ? _mm256_sub_ps(f, cj) : f;
}

ALWAYS_INLINE void tile(const uint32_t* pb, const void* sb, const void* ob, const int fmt,
                        const float* xp, int64_t ldx, const float* xs, const float* ts,
                        const float* bias, float* y, int64_t m0, const int MT, int64_t N,
                        int64_t K, int64_t g, int64_t b, const int bits, const int center)
{
    const int P = 32 / bits, C = 8 / MT; /* C independent sums per token: 8 FMA chains */
    const int64_t G = K / g, wpg = g / P;
    __m256 yv[8];
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++) yv[m] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m256 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        const uint32_t* p = pb + gi * wpg * 8;
        const float* xg = xp + m0 * ldx + gi * g;
        const __m256 c = centers(ob, gi, fmt);
        __m256 cj[8];
#pragma GCC unroll 8
        for (int j = 0; j < P; j++)
            cj[j] = j == P - 1 ? c : _mm256_mul_ps(c, _mm256_set1_ps((float)(1u << (bits * j))));
        for (int64_t w = 0; w < wpg; w++) {
            _mm_prefetch((const char*)(p + w * 8) + PREFETCH_BYTES, _MM_HINT_T0);
            __m256i word = _mm256_loadu_si256((const __m256i*)(p + w * 8));
#pragma GCC unroll 8
            for (int j = 0; j < P; j++) {
                __m256 f = decode(word, bits, j, center, cj[j]);
#pragma GCC unroll 8
                for (int m = 0; m < MT; m++)
                    acc[m * C + j % C] = _mm256_fmadd_ps(
                        f, _mm256_broadcast_ss(xg + m * ldx + w * P + j), acc[m * C + j % C]);
            }
        }
        __m256 s, o;
        group_params(sb, ob, c, gi, fmt, center, &s, &o);
#pragma GCC unroll 8
        for (int m = 0; m < MT; m++) {
            __m256* a = acc + m * C; /* a fixed tree: the same order for every call */
            if (C == 8) {
                a[0] = _mm256_add_ps(a[0], a[4]); a[1] = _mm256_add_ps(a[1], a[5]);
                a[2] = _mm256_add_ps(a[2], a[6]); a[3] = _mm256_add_ps(a[3], a[7]);
            }
            if (C >= 4) {
                a[0] = _mm256_add_ps(a[0], a[2]); a[1] = _mm256_add_ps(a[1], a[3]);
            }
            if (C >= 2)
                a[0] = _mm256_add_ps(a[0], a[1]);
            yv[m] = _mm256_fmadd_ps(s, a[0], yv[m]);
            yv[m] = _mm256_fmadd_ps(o, _mm256_broadcast_ss(xs + (m0 + m) * G + gi), yv[m]);
        }
    }
    const int64_t n0 = b * 8, left = N - n0;
    const __m256 bv = bias && left >= 8 ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < MT; m++) {
        __m256 out = _mm256_mul_ps(yv[m], _mm256_broadcast_ss(ts + m0 + m));
        float* yr = y + (m0 + m) * N + n0;
        if (left >= 8) {
            _mm256_storeu_ps(yr, _mm256_add_ps(out, bv));
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, out);
            for (int64_t i = 0; i < left; i++)
                yr[i] = bias ? tmp[i] + bias[n0 + i] : tmp[i];
        }
    }
}

/* Rows [m_begin, m_end) of x through row block b, in tiles of 8 (MAXT), 4, 2 and 1. */
ALWAYS_INLINE void rows(const uint32_t* pb, const void* sb, const void* ob, const int fmt,
                        const float* xp, int64_t ldx, const float* xs, const float* ts,
                        const float* bias, float* y, int64_t m_begin, int64_t m_end, int64_t N,
                        int64_t K, int64_t g, int64_t b, const int bits, const int center)
{
    int64_t m0 = m_begin;
    while (m0 < m_end) {
        const int64_t left = m_end - m0;
        const int mt = MAXT >= 8 && left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
#define TILE(T) \
    tile(pb, sb, ob, fmt, xp, ldx, xs, ts, bias, y, m0, T, N, K, g, b, bits, center)
        if (mt == 8)
            TILE(8);
        else if (mt == 4)
            TILE(4);
        else if (mt == 2)
            TILE(2);
        else
            TILE(1);
#undef TILE
        m0 += mt;
    }
}

/* The tokens are taken in chunks of about CHUNK_BYTES of prepared activations (a multiple of 8
 * rows; 0: all at once): each thread runs its row blocks over one chunk, then the next, so that
 * a chunk is read from memory once and then from the thread's L2 for each of its row blocks.
 * Every thread gets the same row blocks in every chunk (static schedule) and the tiles are
 * those of one pass, so the results do not change. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (1024 * 1024)
#endif

static void gemm(const uint32_t* codes, const void* sb, const void* ob, const int fmt,
                 const float* xp, int64_t ldx, const float* xs, const float* ts,
                 const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t g,
                 const int bits, const int center)
{
    const int64_t nb = (N + 7) / 8, G = K / g, words = K / (32 / bits);
    const size_t sbytes = fmt == FMT_COMPACT ? 2 : 4;
    int64_t mc = CHUNK_BYTES > 0 ? ((int64_t)CHUNK_BYTES / (4 * ldx)) & ~(int64_t)7 : M;
    if (mc < 8)
        mc = 8;
#pragma omp parallel
    for (int64_t c0 = 0; c0 < M; c0 += mc) {
        const int64_t c1 = M - c0 > mc ? c0 + mc : M;
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < nb; b++) {
            const uint32_t* pb = codes + b * words * 8;
            const char* sbb = (const char*)sb + b * G * 8 * sbytes;
            const char* obb = (const char*)ob + b * G * OREC(fmt);
#define ROWS(F, B, Z) rows(pb, sbb, obb, F, xp, ldx, xs, ts, bias, y, c0, c1, N, K, g, b, B, Z)
#define BY_FMT(B, Z) \
    (fmt == FMT_OFFSET ? ROWS(FMT_OFFSET, B, Z) \
                       : fmt == FMT_COMPACT ? ROWS(FMT_COMPACT, B, Z) : ROWS(FMT_CENTER, B, Z))
            if (bits == 4)
                center ? BY_FMT(4, 1) : BY_FMT(4, 0);
            else
                center ? BY_FMT(8, 1) : BY_FMT(8, 0);
#undef BY_FMT
#undef ROWS
        }
    }
}

static inline float load_x(const void* x, int64_t i, int dtype)
{
    if (dtype == 0) { /* bf16 */
        uint32_t bits = (uint32_t)((const uint16_t*)x)[i] << 16;
        float v;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    if (dtype == 1) /* fp16 */
        return _cvtsh_ss(((const uint16_t*)x)[i]);
    return ((const float*)x)[i];
}

/* 8 activations from element i as fp32 (exact for each dtype). */
static inline __m256 load_x8(const void* x, int64_t i, int dtype)
{
    if (dtype == 2)
        return _mm256_loadu_ps((const float*)x + i);
    __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)x + i));
    if (dtype == 1)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 v) /* a fixed order */
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One token: xp = x * 2^-p * 2^-(bits (k % P)) (the last code of a word: x * 2^-p), xs = group
 * sums of x * 2^-p, ts = 2^p, with 2^p the power of two that brings max|x| into [1, 2)
 * (p >= -100). Returns 1 for a token holding Inf or NaN. */
static int prepare_token(const void* xt, int dtype, int64_t K, int64_t g, int bits, float* xp,
                         float* xs, float* ts)
{
    const int P = 32 / bits;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 big = _mm256_set1_ps(3.4028235e38f);
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 a = _mm256_and_ps(load_x8(xt, k, dtype), absmask);
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* > max, or NaN */
        vmax = _mm256_max_ps(vmax, a);
    }
    if (_mm256_movemask_ps(vbad))
        return 1;
    float tmp[8], amax = 0.0f;
    _mm256_storeu_ps(tmp, vmax);
    for (int i = 0; i < 8; i++)
        amax = tmp[i] > amax ? tmp[i] : amax;
    for (; k < K; k++) {
        float v = fabsf(load_x(xt, k, dtype));
        if (!(v <= 3.4028235e38f))
            return 1;
        amax = v > amax ? v : amax;
    }
    int e = 0;
    frexpf(amax, &e); /* amax = f 2^e, f in [0.5, 1): amax 2^(1 - e) in [1, 2); 0 gives e = 0 */
    int p = e - 1;
    if (p < -100)
        p = -100;
    *ts = ldexpf(1.0f, p);
    const float inv = ldexpf(1.0f, -p);
    float pos[8];
    for (int j = 0; j < 8; j++) /* the last code of a word is shifted down, not masked */
        pos[j] = (j % P == P - 1) ? 1.0f : ldexpf(1.0f, -bits * (j % P));
    const __m256 vinv = _mm256_set1_ps(inv), vpos = _mm256_loadu_ps(pos);
    for (int64_t gi = 0; gi < K / g; gi++) {
        const int64_t k0 = gi * g, k1 = k0 + g;
        if (g % 8 == 0) {
            __m256 sum = _mm256_setzero_ps();
            for (k = k0; k < k1; k += 8) {
                __m256 v = _mm256_mul_ps(load_x8(xt, k, dtype), vinv);
                sum = _mm256_add_ps(sum, v);
                _mm256_storeu_ps(xp + k, _mm256_mul_ps(v, vpos));
            }
            xs[gi] = hsum8(sum);
        } else {
            float sum = 0.0f;
            for (k = k0; k < k1; k++) {
                float v = load_x(xt, k, dtype) * inv;
                sum += v;
                xp[k] = v * pos[k % 8];
            }
            xs[gi] = sum;
        }
    }
    return 0;
}

/* x [M, K] (dtype 0: bf16, 1: fp16, 2: fp32); xp [M, ldx] with ldx >= K, xs [M, K / g],
 * ts [M], y [M, N] fp32 (written here); bias fp32 [N] or NULL; codes / sb / ob: the layout
 * above, ceil(N / 8) blocks, in format fmt (FMT_OFFSET, FMT_COMPACT, FMT_CENTER). Returns the
 * number of tokens holding Inf or NaN (y is not computed when there are any), or -1 for
 * ldx < K (nothing written). */
int64_t lq_wa16_avx2(const uint32_t* codes, const void* sb, const void* ob, int64_t fmt,
                     const void* x, int64_t dtype, float* xp, int64_t ldx, float* xs,
                     float* ts, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                     int64_t g, int64_t bits)
{
    if (ldx < K)
        return -1;
    const int64_t G = K / g;
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++)
        bad += prepare_token((const char*)x + m * K * (dtype == 2 ? 4 : 2), (int)dtype, K, g,
                             (int)bits, xp + m * ldx, xs + m * G, ts + m);
    if (bad)
        return bad;
    /* fp32 activations: centered codes, so that the sums carry no c x offset (whose rounding
     * would cost fp32 results several bits). */
    gemm(codes, sb, ob, (int)fmt, xp, ldx, xs, ts, bias, y, M, N, K, g, (int)bits,
         dtype == 2);
    return 0;
}

/* ---- dequantization into a float buffer (the scratch paths) ------------------------------
 *
 * Rows [r0, r1) of a weight in linquant's canonical storage (linquant.ops.packing: the codes of
 * the row-major [N, K] weight as one little-endian bit stream, 2-8 bits each; two's complement
 * for symmetric codes) into out [(r1 - r0), K] (dtype 0: bf16, 1: fp16, 2: fp32), computing
 * w = ((c - z) * s) + m in fp32 in that order, as the PyTorch path (kernels/cpu.py,
 * _RowDequant; ops/affine.py, dequantize_packed) does (z and m only where given), then rounded
 * to nearest even: the same bits. The parameters are read as stored: scales and float offsets
 * in bf16 / fp16 / fp32 (sdt, mdt as dtype), integer zero points as a packed stream of
 * bits-wide unsigned codes; element (n, k) takes parameter n * sn + (k / g) * sg (a group:
 * sn = K / g, sg = 1; a row: sn = 1, sg = 0, g = K; a column: sn = 0, sg = 1, g = 1; the
 * tensor: 0, 0, K). Vectorized for 4- and 8-bit codes with K % 8 == 0 and parameters constant
 * over each 8 codes (g % 8 == 0) or one per column (g == 1); any other case one code at a
 * time. Threads split the rows. Non-finite parameters: Inf and NaN where the PyTorch ops
 * give them, the other elements the same bits (a NaN's own bits may differ). */

static inline uint16_t bf16_rne(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    /* NaN: quiet, sign and top payload kept (PyTorch's own conversions write 0x7FC0 or
     * 0xFFFF, by code path); rounding it would carry a full payload into the exponent */
    if ((b & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((b >> 16) | 0x40u);
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

static inline float param_at(const void* p, int64_t i, int dt)
{
    if (dt == 2)
        return ((const float*)p)[i];
    if (dt == 1)
        return _cvtsh_ss(((const uint16_t*)p)[i]);
    const uint32_t b = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline __m256 param8(const void* p, int64_t i, int dt) /* 8 consecutive parameters */
{
    if (dt == 2)
        return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (dt == 1)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline void store8(void* out, int64_t i, int dtype, __m256 v)
{
    if (dtype == 2) {
        _mm256_storeu_ps((float*)out + i, v);
    } else if (dtype == 1) {
        _mm_storeu_si128((__m128i*)((uint16_t*)out + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        const __m256i b = _mm256_castps_si256(v);
        const __m256i one = _mm256_set1_epi32(1);
        __m256i r = _mm256_add_epi32(
            b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                _mm256_and_si256(_mm256_srli_epi32(b, 16), one)));
        r = _mm256_srli_epi32(r, 16);
        /* NaN lanes (finite parameters give none): quiet NaN, as bf16_rne */
        const __m256i absb = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF));
        const __m256i nan = _mm256_cmpgt_epi32(absb, _mm256_set1_epi32(0x7F800000));
        const __m256i q = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
        r = _mm256_blendv_epi8(r, q, nan);
        _mm_storeu_si128((__m128i*)((uint16_t*)out + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(r),
                                          _mm256_extracti128_si256(r, 1)));
    }
}

static inline void store1(void* out, int64_t i, int dtype, float v)
{
    if (dtype == 2)
        ((float*)out)[i] = v;
    else if (dtype == 1)
        ((uint16_t*)out)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    else
        ((uint16_t*)out)[i] = bf16_rne(v);
}

/* code idx of a packed stream, signed (symmetric) or not */
static inline int32_t code_at(const uint8_t* q, int64_t idx, int bits, int symmetric)
{
    const int64_t bit = idx * bits;
    const int64_t byte = bit >> 3;
    const int sh = (int)(bit & 7);
    uint32_t v = q[byte];
    if (sh + bits > 8)
        v |= (uint32_t)q[byte + 1] << 8;
    int32_t u = (int32_t)((v >> sh) & ((1u << bits) - 1u));
    if (symmetric) {
        const int32_t half = 1 << (bits - 1);
        u = (u ^ half) - half;
    }
    return u;
}

/* codes idx .. idx + 7 of a packed 4- or 8-bit stream (idx % 8 == 0), as fp32 */
static inline __m256 codes8(const uint8_t* q, int64_t idx, int bits, int symmetric)
{
    __m256i c;
    if (bits == 4) {
        uint32_t w;
        memcpy(&w, q + idx / 2, 4);
        c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)w),
                                               _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                             _mm256_set1_epi32(15));
        if (symmetric) /* (u ^ 8) - 8 */
            c = _mm256_sub_epi32(_mm256_xor_si256(c, _mm256_set1_epi32(8)),
                                 _mm256_set1_epi32(8));
    } else {
        const __m128i b = _mm_loadl_epi64((const __m128i*)(q + idx));
        c = symmetric ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    }
    return _mm256_cvtepi32_ps(c);
}

/* Row n of the weight, dequantized into out[o0 .. o0 + K) (any width, mode and granularity;
 * vec: 4 / 8 bits with K and the group whole multiples of 8, the AVX2 path). */
static void dequant_row(const uint8_t* q, const void* s, int sdt, const uint8_t* zq,
                        const void* m, int mdt, int64_t sn, int64_t sg, int64_t g, void* out,
                        int dt, int64_t n, int64_t o0, int64_t K, int b, int sym, int vec)
{
    if (!vec) {
        for (int64_t k = 0; k < K; k++) {
            const int64_t p = n * sn + (k / g) * sg;
            float t = (float)code_at(q, n * K + k, b, sym);
            if (zq)
                t = t - (float)code_at(zq, p, b, 0);
            t = t * param_at(s, p, sdt);
            if (m)
                t = t + param_at(m, p, mdt);
            store1(out, o0 + k, dt, t);
        }
        return;
    }
    const int64_t G = g == 1 ? K / 8 : K / g, step = g == 1 ? 8 : g;
    for (int64_t gi = 0; gi < G; gi++) { /* a group, or 8 columns of per-column params */
        const int64_t k0 = gi * step;
        __m256 vs, vz = _mm256_setzero_ps(), vm = _mm256_setzero_ps();
        if (g == 1) {
            const int64_t p = n * sn + k0;
            vs = param8(s, p, sdt);
            if (zq)
                vz = codes8(zq, p, b, 0);
            if (m)
                vm = param8(m, p, mdt);
        } else {
            const int64_t p = n * sn + gi * sg;
            vs = _mm256_set1_ps(param_at(s, p, sdt));
            if (zq)
                vz = _mm256_set1_ps((float)code_at(zq, p, b, 0));
            if (m)
                vm = _mm256_set1_ps(param_at(m, p, mdt));
        }
        for (int64_t k = k0; k < k0 + step; k += 8) {
            __m256 t = codes8(q, n * K + k, b, sym);
            if (zq)
                t = _mm256_sub_ps(t, vz);
            t = _mm256_mul_ps(t, vs);
            if (m)
                t = _mm256_add_ps(t, vm);
            store8(out, o0 + k, dt, t);
        }
    }
}

static int dequant_vec(int64_t b, int64_t K, int64_t g, int64_t sg)
{
    return (b == 4 || b == 8) && K % 8 == 0 && (g % 8 == 0 || (g == 1 && sg == 1));
}

/* ---- the same dequantization with AVX-512 (F, BW, VL), chosen at run time -----------------
 *
 * This library is built for AVX2 (any x86-64 CPU since Haswell / Zen 1); these functions alone
 * are compiled for AVX-512 and called only when the caller says the CPU has it (wide = 1;
 * native.py: torch.cpu's AVX-512 probe, not under LINQUANT_MAX_CPU_ISA=avx2). The same
 * arithmetic in the same order, so the same bits: 16 lanes instead of 8, and for 4-bit codes
 * whose parameters are constant over 32 codes a table instead of arithmetic: the 16 values
 * ((c - z) * s) + m of a group, computed in fp32 and rounded once, then looked up per code
 * (vpermw / vpermps): the formula the per-code path evaluates, evaluated per code value. */

#define WIDE __attribute__((target("avx512f,avx512bw,avx512vl")))

WIDE static inline __m512 param16(const void* p, int64_t i, int dt) /* 16 consecutive params */
{
    if (dt == 2)
        return _mm512_loadu_ps((const float*)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
    if (dt == 1)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 fp32 -> 16 bf16, rounded to nearest even; NaN as bf16_rne */
WIDE static inline __m256i bf16x16(__m512 v)
{
    const __m512i b = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(b, 16);
    __m512i r = _mm512_add_epi32(
        b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(hi, _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(
        _mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

WIDE static inline __m256i half16(__m512 v, int dtype) /* 16 fp32 -> 16 bf16 or fp16 */
{
    if (dtype == 1)
        return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return bf16x16(v);
}

WIDE static inline void store16(void* out, int64_t i, int dtype, __m512 v)
{
    if (dtype == 2)
        _mm512_storeu_ps((float*)out + i, v);
    else
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), half16(v, dtype));
}

/* the 4-bit codes of 8 bytes as 16 bytes, one code each, in stream order (low nibble first) */
WIDE static inline __m128i nibbles16(const uint8_t* q)
{
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)q));
    return _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(15)),
                        _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0xF0)), 4));
}

/* codes idx .. idx + 15 of a packed 4- or 8-bit stream (idx % 16 == 0), as fp32 */
WIDE static inline __m512 codes16(const uint8_t* q, int64_t idx, int bits, int symmetric)
{
    __m512i c;
    if (bits == 4) {
        c = _mm512_cvtepu8_epi32(nibbles16(q + idx / 2));
        if (symmetric) /* (u ^ 8) - 8 */
            c = _mm512_sub_epi32(_mm512_xor_si512(c, _mm512_set1_epi32(8)),
                                 _mm512_set1_epi32(8));
    } else {
        const __m128i b = _mm_loadu_si128((const __m128i*)(q + idx));
        c = symmetric ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
    }
    return _mm512_cvtepi32_ps(c);
}

/* Row n as dequant_row, for 4- or 8-bit codes with K % 16 == 0 and parameters constant over
 * each 16 codes (g % 16 == 0) or one per column (g == 1); 4-bit groups of g % 32 == 0 by
 * table. */
WIDE static void dequant_row_wide(const uint8_t* q, const void* s, int sdt, const uint8_t* zq,
                                  const void* m, int mdt, int64_t sn, int64_t sg, int64_t g,
                                  void* out, int dt, int64_t n, int64_t o0, int64_t K, int b,
                                  int sym)
{
    const int64_t base = n * K;
    if (b == 4 && g % 32 == 0) {
        /* the codes' values as stored: unsigned 0 .. 15, or two's complement -8 .. 7 */
        const __m512 cu = sym ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3,
                                               -2, -1)
                              : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                               14, 15);
        for (int64_t gi = 0; gi < K / g; gi++) {
            const int64_t p = n * sn + gi * sg, k0 = gi * g;
            __m512 t = cu;
            if (zq)
                t = _mm512_sub_ps(t, _mm512_set1_ps((float)code_at(zq, p, b, 0)));
            t = _mm512_mul_ps(t, _mm512_set1_ps(param_at(s, p, sdt)));
            if (m)
                t = _mm512_add_ps(t, _mm512_set1_ps(param_at(m, p, mdt)));
            if (dt == 2) {
                for (int64_t k = k0; k < k0 + g; k += 16) {
                    const __m512i c = _mm512_cvtepu8_epi32(nibbles16(q + (base + k) / 2));
                    _mm512_storeu_ps((float*)out + o0 + k, _mm512_permutexvar_ps(c, t));
                }
            } else {
                const __m512i table = _mm512_zextsi256_si512(half16(t, dt));
                for (int64_t k = k0; k < k0 + g; k += 32) {
                    /* 16 bytes -> 16 dwords; word pairs (low nibble, high nibble) */
                    const __m512i d = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128((const __m128i*)(q + (base + k) / 2)));
                    const __m512i c = _mm512_or_si512(
                        _mm512_and_si512(d, _mm512_set1_epi32(15)),
                        _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xF0)), 12));
                    _mm512_storeu_si512((uint16_t*)out + o0 + k,
                                        _mm512_permutexvar_epi16(c, table));
                }
            }
        }
        return;
    }
    const int64_t G = g == 1 ? K / 16 : K / g, step = g == 1 ? 16 : g;
    for (int64_t gi = 0; gi < G; gi++) { /* a group, or 16 columns of per-column params */
        const int64_t k0 = gi * step;
        __m512 vs, vz = _mm512_setzero_ps(), vm = _mm512_setzero_ps();
        if (g == 1) {
            const int64_t p = n * sn + k0;
            vs = param16(s, p, sdt);
            if (zq)
                vz = codes16(zq, p, b, 0);
            if (m)
                vm = param16(m, p, mdt);
        } else {
            const int64_t p = n * sn + gi * sg;
            vs = _mm512_set1_ps(param_at(s, p, sdt));
            if (zq)
                vz = _mm512_set1_ps((float)code_at(zq, p, b, 0));
            if (m)
                vm = _mm512_set1_ps(param_at(m, p, mdt));
        }
        for (int64_t k = k0; k < k0 + step; k += 16) {
            __m512 t = codes16(q, base + k, b, sym);
            if (zq)
                t = _mm512_sub_ps(t, vz);
            t = _mm512_mul_ps(t, vs);
            if (m)
                t = _mm512_add_ps(t, vm);
            store16(out, o0 + k, dt, t);
        }
    }
}

static int dequant_wide(int64_t b, int64_t K, int64_t g, int64_t sg)
{
    return (b == 4 || b == 8) && K % 16 == 0 && (g % 16 == 0 || (g == 1 && sg == 1));
}

/* which row function: 2 (AVX-512, when wide), 1 (AVX2) or 0 (one code at a time) */
static int dequant_kind(int64_t wide, int64_t b, int64_t K, int64_t g, int64_t sg)
{
    if (wide && dequant_wide(b, K, g, sg))
        return 2;
    return dequant_vec(b, K, g, sg);
}

/* the row function lq_dequant_rows / lq_dequant_gather would run (for tests) */
int64_t lq_dequant_kind(int64_t wide, int64_t bits, int64_t K, int64_t g, int64_t sg)
{
    return dequant_kind(wide, bits, K, g, sg);
}

static void dequant_any(const uint8_t* q, const void* s, int sdt, const uint8_t* zq,
                        const void* m, int mdt, int64_t sn, int64_t sg, int64_t g, void* out,
                        int dt, int64_t n, int64_t o0, int64_t K, int b, int sym, int kind)
{
    if (kind == 2)
        dequant_row_wide(q, s, sdt, zq, m, mdt, sn, sg, g, out, dt, n, o0, K, b, sym);
    else
        dequant_row(q, s, sdt, zq, m, mdt, sn, sg, g, out, dt, n, o0, K, b, sym, kind);
}

/* Rows [r0, r1) of the weight, dequantized into out ([r1 - r0, K], row-major); wide: the CPU
 * has AVX-512 F, BW and VL (the caller checks). */
int64_t lq_dequant_rows(const uint8_t* q, const void* s, int64_t sdt, const uint8_t* zq,
                        const void* m, int64_t mdt, int64_t sn, int64_t sg, int64_t g, void* out,
                        int64_t dtype, int64_t r0, int64_t r1, int64_t K, int64_t bits,
                        int64_t symmetric, int64_t wide)
{
    const int kind = dequant_kind(wide, bits, K, g, sg);
#pragma omp parallel for schedule(static) if ((r1 - r0) * K >= 65536)
    for (int64_t n = r0; n < r1; n++)
        dequant_any(q, s, (int)sdt, zq, m, (int)mdt, sn, sg, g, out, (int)dtype, n,
                    (n - r0) * K, K, (int)bits, (int)symmetric, kind);
    return 0;
}

/* Rows rows[0 .. count) of the weight (an embedding table), dequantized into out
 * ([count, K], row-major). The caller checks every index is in [0, N), and wide as above. */
int64_t lq_dequant_gather(const uint8_t* q, const void* s, int64_t sdt, const uint8_t* zq,
                          const void* m, int64_t mdt, int64_t sn, int64_t sg, int64_t g,
                          void* out, int64_t dtype, const int64_t* rows, int64_t count, int64_t K,
                          int64_t bits, int64_t symmetric, int64_t wide)
{
    const int kind = dequant_kind(wide, bits, K, g, sg);
#pragma omp parallel for schedule(static) if (count * K >= 65536)
    for (int64_t i = 0; i < count; i++)
        dequant_any(q, s, (int)sdt, zq, m, (int)mdt, sn, sg, g, out, (int)dtype, rows[i],
                    i * K, K, (int)bits, (int)symmetric, kind);
    return 0;
}
