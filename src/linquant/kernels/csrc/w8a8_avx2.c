/* linquant: W8A8 linear (int8 activations x int8 weights, int32 sums) on x86 CPUs with AVX2
 * only (compiled on first use; see native.py): the same entry point, arguments, weight layout
 * and results as lq_w8a8 in w8a8.c (AVX512-VNNI), bit-identical to
 * linquant.kernels.reference.linear_w8a8. Compile with -ffp-contract=off.
 *
 * Without VNNI the int8 product is vpmaddubsw (u8 x s8, adjacent pairs summed into int16 with
 * saturation), vpmaddwd (int16 pairs into int32) and vpaddd: three instructions per 32
 * products, as in fbgemm. fbgemm keeps the int16 sums from saturating by quantizing
 * activations to 7 bits (reduce_range). Here the codes keep 8 bits and every sum stays exact:
 *
 * - The u8 operand is the weight, v = w + 128 (the stored int8 code with its top bit flipped).
 *   The s8 operand is the activation code d = a - 128 (w8a8.c's a; dynamic and static
 *   symmetric d = c in [-127, 127], static asymmetric d in [-128, 127]), less a per-token shift
 *   t (below). Then sum_k v d = sum_k w d + 128 sum_k d, and the token's sum of codes is
 *   subtracted at the end.
 * - A pair v0 d0 + v1 d1 fits int16 when d0 and d1 differ in sign (at most 255 * 128 = 32640)
 *   or when |d0| + |d1| <= 128. split_token moves what a pair has beyond that into a sparse
 *   remainder e: d1 becomes sign(d1) (128 - |d0|), and e takes d1's rest (|e| <= 127). e is
 *   kept per 4-k chunk (a chunk index and its 4 bytes; each pair of e holds a zero, so it is
 *   exact too) and multiplied against the same weight chunk. On all-MiniLM-L6-v2's linear
 *   inputs 0.3-3% of the chunks of a token have a remainder; on Gaussian codes about 1.5%.
 * - t: the midpoint of the token's codes where they span at most 128, else 0. Codes of one
 *   sign (ReLU outputs, a constant token) would otherwise leave a remainder in most pairs;
 *   shifted they lie in [-64, 64] and leave none. sum_k w (d - t) = sum_k w d
 *   - t colsum, so t colsum is added back per token in the epilogue.
 * - The int32 sums wrap like w8a8.c's: the final sum_k (a - zp) w is exact where it fits int32.
 *
 * Every pair stays exact whatever the codes; only the remainder's size depends on them. Where
 * more than 30% of a call's chunks would have one, the call takes the sign form instead
 * (tile_sign, four instructions per 32 products). Static asymmetric codes can reach -128,
 * which the sign form cannot negate; past 50% they take int16 products (tile16, slower than
 * the sign form). Static asymmetric codes of post-ReLU / GELU activations sit near a = z, so
 * d is near -128 in most pairs (65-93% of the chunks had a remainder on GELU outputs), and
 * take tile16.
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

/* Dynamic per-token codes, as w8a8.c: s = max(max|x| / 127, FLT_MIN),
 * c = round_half_even(x / s), stored as d = c (w8a8.c stores a = c + 128). Returns 1 when the
 * token holds Inf or NaN (not quantized). */
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
 * symmetric a = clamp(t, -127, 127) + 128 or asymmetric a = clamp(t + z, 0, 255), stored as
 * d = a - 128 (in [-128, 127]). */
static void quantize_static(const float* xr, int64_t K, int64_t Kp, int8_t* dr, float s,
                            int64_t z)
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
        store8s(dr + k, _mm256_cvtps_epi32(_mm256_add_ps(t, shv)));
    }
    for (; k < K; k++) {
        float t = nearbyintf(xr[k] / s);
        if (t != t)
            t = 0.0f;
        t += add;
        t = t < lo ? lo : (t > hi ? hi : t);
        dr[k] = (int8_t)(int)(t + shift);
    }
    for (; k < Kp; k++)
        dr[k] = 0;
}

/* The midpoint t of a token's codes d [K] where they span at most 128 (then every d - t is in
 * [-64, 64] and no pair needs a remainder), else 0. */
static int32_t token_shift(const int8_t* dr, int64_t K)
{
    __m256i mn = _mm256_set1_epi8(127), mx = _mm256_set1_epi8(-128);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(dr + k));
        mn = _mm256_min_epi8(mn, v);
        mx = _mm256_max_epi8(mx, v);
    }
    int8_t lo[32], hi[32];
    _mm256_storeu_si256((__m256i*)lo, mn);
    _mm256_storeu_si256((__m256i*)hi, mx);
    int a = 127, b = -128;
    for (int i = 0; i < 32; i++) {
        a = lo[i] < a ? lo[i] : a;
        b = hi[i] > b ? hi[i] : b;
    }
    for (; k < K; k++) {
        a = dr[k] < a ? dr[k] : a;
        b = dr[k] > b ? dr[k] : b;
    }
    if (a > b || b - a > 128)
        return 0;
    return (a + b) >> 1; /* floor: d - t in [-64, 64] */
}

/* One token's codes d [Kp] (zero past K): shifted by t = token_shift (past K they stay zero),
 * then split in place into d' + e so that every pair of d' passes vpmaddubsw exactly (see the
 * top of the file): a pair (d0, d1) of one sign with |d0| + |d1| > 128 keeps d0 and
 * sign(d1) (128 - |d0|) in d', and moves the rest of d1 to e (|e1| <= 127). e is kept sparse,
 * per 4-k chunk: chunk index ridx[j] and its 4 bytes rpat[j]. Returns sum_k (d_k - t) over
 * k < K; *nres: e's entries; *shift: t. */
static int32_t split_token(int8_t* dr, int64_t K, int64_t Kp, int32_t* ridx, int32_t* rpat,
                           int32_t* nres, int32_t* shift)
{
    const int32_t t = token_shift(dr, K);
    *shift = t;
    if (t) {
        const __m256i tv = _mm256_set1_epi8((char)t);
        int64_t k = 0;
        for (; k + 32 <= K; k += 32)
            _mm256_storeu_si256((__m256i*)(dr + k),
                                _mm256_sub_epi8(_mm256_loadu_si256((const __m256i*)(dr + k)), tv));
        for (; k < K; k++)
            dr[k] = (int8_t)(dr[k] - t);
    }
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const __m256i lim = _mm256_set1_epi16(128), neg1 = _mm256_set1_epi16(-1);
    __m256i sum = _mm256_setzero_si256();
    int32_t n = 0;
    int64_t k = 0;
    for (; k < Kp; k += 32) {
        const int64_t len = Kp - k < 32 ? Kp - k : 32;
        __m256i v;
        if (len == 32) {
            v = _mm256_loadu_si256((const __m256i*)(dr + k));
        } else {
            int8_t tmp[32] = {0};
            memcpy(tmp, dr + k, (size_t)len);
            v = _mm256_loadu_si256((const __m256i*)tmp);
        }
        /* sum d: pairs into int16 (|.| <= 256), pairs into int32 */
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
        /* per pair (int16 lane: d0 low byte, d1 high byte): |d0| + |d1|, and the sign bits */
        const __m256i pa = _mm256_maddubs_epi16(_mm256_abs_epi8(v), ones8);
        const __m256i same = _mm256_cmpgt_epi16(_mm256_xor_si256(v, _mm256_slli_epi16(v, 8)),
                                                neg1); /* bit 15 of d1 ^ d0 clear */
        const __m256i bad = _mm256_and_si256(_mm256_cmpgt_epi16(pa, lim), same);
        if (!_mm256_movemask_epi8(bad))
            continue;
        for (int64_t c = k / 4; c < (k + len) / 4; c++) {
            int8_t e[4] = {0, 0, 0, 0};
            int any = 0;
            for (int p = 0; p < 4; p += 2) {
                const int d0 = dr[4 * c + p], d1 = dr[4 * c + p + 1];
                const int a0 = d0 < 0 ? -d0 : d0, a1 = d1 < 0 ? -d1 : d1;
                if ((d0 ^ d1) >= 0 && a0 + a1 > 128) {
                    const int keep = d1 < 0 ? -(128 - a0) : 128 - a0;
                    dr[4 * c + p + 1] = (int8_t)keep;
                    e[p + 1] = (int8_t)(d1 - keep);
                    any = 1;
                }
            }
            if (any) {
                ridx[n] = (int32_t)c;
                memcpy(rpat + n, e, 4);
                n++;
            }
        }
    }
    *nres = n;
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum),
                                     _mm256_extracti128_si256(sum, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
}

/* The activation buffer a: codes d' int8 [M, Kp]; then, 64-byte aligned, per token the sum of
 * its shifted codes, its shift t and its count of e entries (int32 [M] each), and e's chunk
 * indices and bytes (int32 [M, Kp / 4] each); then, 64-byte aligned, tile16's codes (int16
 * [M, Kp]): 5 M Kp + 12 M + 128 bytes at most. */
typedef struct {
    int8_t* d;
    int32_t *dsum, *shift, *nres, *ridx, *rpat;
    int16_t* d16;
} Acts;

static Acts acts_at(uint8_t* a, int64_t M, int64_t Kp)
{
    Acts r;
    uintptr_t p = (uintptr_t)a;
    r.d = (int8_t*)p;
    p = (p + (uintptr_t)(M * Kp) + 63) & ~(uintptr_t)63;
    r.dsum = (int32_t*)p;
    r.shift = r.dsum + M;
    r.nres = r.shift + M;
    r.ridx = r.nres + M;
    r.rpat = r.ridx + M * (Kp / 4);
    p = ((uintptr_t)(r.rpat + M * (Kp / 4)) + 63) & ~(uintptr_t)63;
    r.d16 = (int16_t*)p;
    return r;
}

/* sum over one 4-k chunk of v d for 8 channels: v = w + 128 (u8) times d (s8), pairs into
 * int16 (exact for the pairs split_token leaves), pairs into int32 */
ALWAYS_INLINE __m256i dot4(__m256i v, __m256i d, __m256i ones)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(v, d), ones);
}

/* The epilogue of a tile: a block's zsum, column sums, weight scales and bias (16 channels,
 * zero past N) ... */
typedef struct {
    float sn[16], bv[16];
    __m256i zs[2], cs[2];
    int64_t n0, left;
} Block;

ALWAYS_INLINE void block_init(Block* blk, const int32_t* zsum, const int32_t* colsum,
                              const float* scale_n, const float* bias, int64_t N, int64_t b)
{
    blk->n0 = b * 16;
    blk->left = N - blk->n0;
    for (int h = 0; h < 2; h++) {
        blk->zs[h] = _mm256_loadu_si256((const __m256i*)(zsum + blk->n0 + 8 * h));
        blk->cs[h] = _mm256_loadu_si256((const __m256i*)(colsum + blk->n0 + 8 * h));
    }
    for (int i = 0; i < 16; i++) {
        blk->sn[i] = i < blk->left ? scale_n[blk->n0 + i] : 0.0f;
        blk->bv[i] = (bias && i < blk->left) ? bias[blk->n0 + i] : 0.0f;
    }
}

/* ... and one token's row: int32 sums s[2] = sum v (d - t) (channels 0-7, 8-15), less
 * 128 sum (d - t) and zsum, plus t colsum: sum (a - zp) w. Then times the token's scale ts
 * (dynamic: (acc * s_token) * w_scale; ts < 0: static, acc * (s * w_scale), the product passed
 * in scale_n), plus the bias, stored to yr[n0 .. n0 + min(16, left)). */
ALWAYS_INLINE void block_store(const Block* blk, const __m256i s[2], int32_t dsum, int32_t t,
                               float ts, int has_bias, float* yr)
{
    float out[16];
    const __m256i sub = _mm256_set1_epi32(128 * dsum), tv = _mm256_set1_epi32(t);
    for (int h = 0; h < 2; h++) {
        __m256i acc = _mm256_sub_epi32(_mm256_sub_epi32(s[h], sub), blk->zs[h]);
        if (t)
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(tv, blk->cs[h]));
        __m256 f = _mm256_cvtepi32_ps(acc);
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

/* One block of 16 channels against tokens m0 .. m0 + MT: v d' over all chunks, then each
 * token's remainder e against its chunks (MT < 4: while the chunk is in registers). */
ALWAYS_INLINE void tile(const int8_t* pb, const int32_t* zsum, const int32_t* colsum,
                        const float* scale_n, const float* bias, const Acts* A, const float* as,
                        float* y, int64_t m0, const int MT, int64_t N, int64_t Kp, int64_t b)
{
    __m256i acc[4][2];
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    const int64_t nq = Kp / 4;
    const int8_t* d8 = A->d + m0 * Kp;
    const int32_t* ri[4];
    const int32_t* rp[4];
    int64_t next[4]; /* the chunk of each token's next remainder entry, -1 past the last */
    int32_t jn[4];
    for (int m = 0; m < MT; m++) {
        ri[m] = A->ridx + (m0 + m) * nq;
        rp[m] = A->rpat + (m0 + m) * nq;
        jn[m] = 0;
        next[m] = A->nres[m0 + m] > 0 ? ri[m][0] : -1;
    }
    for (int64_t c = 0; c < nq; c++) {
        _mm_prefetch((const char*)(pb + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        if (MT == 4) {
            /* gcc spills accumulators when this is written with intrinsics; the same
             * instructions with the registers fixed (v0, v1, d, product: ymm8-11) */
            const int8_t* dp = d8 + c * 4;
            __asm__(
#define LQ_TOKEN(DADDR, A0, A1)                                                                 \
                "vpbroadcastd " DADDR ", %%ymm10\n\t"                                             \
                "vpmaddubsw %%ymm10, %%ymm8, %%ymm11\n\t"                                         \
                "vpmaddwd %[ones], %%ymm11, %%ymm11\n\t"                                          \
                "vpaddd %%ymm11, " A0 ", " A0 "\n\t"                                              \
                "vpmaddubsw %%ymm10, %%ymm9, %%ymm11\n\t"                                         \
                "vpmaddwd %[ones], %%ymm11, %%ymm11\n\t"                                          \
                "vpaddd %%ymm11, " A1 ", " A1 "\n\t"
                "vpxor (%[w]), %[flip], %%ymm8\n\t"
                "vpxor 32(%[w]), %[flip], %%ymm9\n\t"
                LQ_TOKEN("(%[d0])", "%[a00]", "%[a01]")
                LQ_TOKEN("(%[d0],%[kp],1)", "%[a10]", "%[a11]")
                LQ_TOKEN("(%[d0],%[kp],2)", "%[a20]", "%[a21]")
                LQ_TOKEN("(%[d3])", "%[a30]", "%[a31]")
#undef LQ_TOKEN
                : [a00] "+x"(acc[0][0]), [a01] "+x"(acc[0][1]), [a10] "+x"(acc[1][0]),
                  [a11] "+x"(acc[1][1]), [a20] "+x"(acc[2][0]), [a21] "+x"(acc[2][1]),
                  [a30] "+x"(acc[3][0]), [a31] "+x"(acc[3][1])
                : [w] "r"(pb + c * 64), [d0] "r"(dp), [kp] "r"(Kp), [d3] "r"(dp + 3 * Kp),
                  [ones] "x"(ones), [flip] "x"(flip)
                : "xmm8", "xmm9", "xmm10", "xmm11", "memory");
            continue;
        }
        const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(pb + c * 64)),
                                            flip);
        const __m256i v1 = _mm256_xor_si256(
            _mm256_loadu_si256((const __m256i*)(pb + c * 64 + 32)), flip);
#pragma GCC unroll 4
        for (int m = 0; m < MT; m++) {
            int32_t u;
            memcpy(&u, d8 + m * Kp + c * 4, sizeof u);
            const __m256i d = _mm256_set1_epi32(u);
            acc[m][0] = _mm256_add_epi32(acc[m][0], dot4(v0, d, ones));
            acc[m][1] = _mm256_add_epi32(acc[m][1], dot4(v1, d, ones));
            if (c == next[m]) {
                const __m256i e = _mm256_set1_epi32(rp[m][jn[m]]);
                acc[m][0] = _mm256_add_epi32(acc[m][0], dot4(v0, e, ones));
                acc[m][1] = _mm256_add_epi32(acc[m][1], dot4(v1, e, ones));
                jn[m]++;
                next[m] = jn[m] < A->nres[m0 + m] ? ri[m][jn[m]] : -1;
            }
        }
    }
    if (MT == 4) {
        for (int m = 0; m < MT; m++) {
            for (int32_t j = 0; j < A->nres[m0 + m]; j++) {
                const int8_t* pc = pb + (int64_t)ri[m][j] * 64;
                const __m256i e = _mm256_set1_epi32(rp[m][j]);
                const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)pc), flip);
                const __m256i v1 = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i*)(pc + 32)), flip);
                acc[m][0] = _mm256_add_epi32(acc[m][0], dot4(v0, e, ones));
                acc[m][1] = _mm256_add_epi32(acc[m][1], dot4(v1, e, ones));
            }
        }
    }
    Block blk;
    block_init(&blk, zsum, colsum, scale_n, bias, N, b);
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
        block_store(&blk, acc[m], A->dsum[m0 + m], A->shift[m0 + m], as ? as[m0 + m] : -1.0f,
                    bias != NULL, y + (m0 + m) * N);
}

/* The sign form, for calls whose remainders would cost more than it does (codes spread evenly
 * over [-127, 127] leave one in about 44% of chunks; Gaussian codes in about 1.5%): |w| (u8;
 * |-128| = 128) times sign(w) d (s8: |d| <= 127, so negating it cannot overflow, where negating
 * w = -128 would): pairs of at most 2 * 128 * 127 = 32512, four instructions per 32 products.
 * Reads the unsplit, unshifted codes (restore_token), so the epilogue's dsum and t are 0. */
ALWAYS_INLINE void tile_sign(const int8_t* pb, const int32_t* zsum, const int32_t* colsum,
                             const float* scale_n, const float* bias, const Acts* A,
                             const float* as, float* y, int64_t m0, const int MT, int64_t N,
                             int64_t Kp, int64_t b)
{
    __m256i acc[4][2];
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t* d8 = A->d + m0 * Kp;
    for (int64_t c = 0; c < Kp / 4; c++) {
        _mm_prefetch((const char*)(pb + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)(pb + c * 64));
        const __m256i w1 = _mm256_loadu_si256((const __m256i*)(pb + c * 64 + 32));
        const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 4
        for (int m = 0; m < MT; m++) {
            int32_t u;
            memcpy(&u, d8 + m * Kp + c * 4, sizeof u);
            const __m256i d = _mm256_set1_epi32(u);
            acc[m][0] = _mm256_add_epi32(acc[m][0], dot4(a0, _mm256_sign_epi8(d, w0), ones));
            acc[m][1] = _mm256_add_epi32(acc[m][1], dot4(a1, _mm256_sign_epi8(d, w1), ones));
        }
    }
    Block blk;
    block_init(&blk, zsum, colsum, scale_n, bias, N, b);
#pragma GCC unroll 4
    for (int m = 0; m < MT; m++)
        block_store(&blk, acc[m], 0, 0, as ? as[m0 + m] : -1.0f, bias != NULL, y + (m0 + m) * N);
}

/* The int16 form, for static asymmetric calls whose remainders would cost more: each 16-byte
 * quarter of a chunk (4 channels x 4 k) sign-extended to int16, times the token's 4 codes
 * d = a - 128 as int16 (one 64-bit broadcast), by vpmaddwd: exact for any codes, int32 lanes
 * holding (k0 + k1) and (k2 + k3) of each channel, added pairwise at the end. On cold
 * 4096 x 4096 weights it ran about 1.5x the sign form's time at 16 and 256 tokens (ad hoc,
 * separate runs). Reads A->d16, the restored codes, so the epilogue's dsum and t are 0. */
ALWAYS_INLINE void tile16(const int8_t* pb, const int32_t* zsum, const int32_t* colsum,
                          const float* scale_n, const float* bias, const Acts* A, float* y,
                          int64_t m0, const int MT, int64_t N, int64_t Kp, int64_t b)
{
    __m256i acc[2][4];
#pragma GCC unroll 2
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < 4; j++)
            acc[m][j] = _mm256_setzero_si256();
    const int16_t* d16 = A->d16 + m0 * Kp;
    for (int64_t c = 0; c < Kp / 4; c++) {
        _mm_prefetch((const char*)(pb + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
        __m256i w[4];
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(pb + c * 64 + 16 * j)));
#pragma GCC unroll 2
        for (int m = 0; m < MT; m++) {
            int64_t v;
            memcpy(&v, d16 + m * Kp + c * 4, sizeof v);
            const __m256i dv = _mm256_set1_epi64x(v);
            for (int j = 0; j < 4; j++)
                acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(w[j], dv));
        }
    }
    Block blk;
    block_init(&blk, zsum, colsum, scale_n, bias, N, b);
    for (int m = 0; m < MT; m++) {
        /* hadd: [c0, c1, c4, c5 | c2, c3, c6, c7] of 8 channels; 0xD8 puts them in order */
        const __m256i sums[2] = {
            _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][0], acc[m][1]), 0xD8),
            _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][2], acc[m][3]), 0xD8)};
        block_store(&blk, sums, 0, 0, -1.0f, bias != NULL, y + (m0 + m) * N); /* static */
    }
}

/* Undo split_token on one token: d' + e + t, the codes as quantized (for tile_sign and
 * tile16). */
static void restore_token(const Acts* A, int64_t m, int64_t K, int64_t Kp)
{
    int8_t* dr = A->d + m * Kp;
    const int64_t nq = Kp / 4;
    for (int32_t j = 0; j < A->nres[m]; j++) {
        int8_t e[4];
        memcpy(e, A->rpat + m * nq + j, 4);
        for (int i = 0; i < 4; i++)
            dr[4 * A->ridx[m * nq + j] + i] = (int8_t)(dr[4 * A->ridx[m * nq + j] + i] + e[i]);
    }
    const int32_t t = A->shift[m];
    for (int64_t k = 0; t && k < K; k++)
        dr[k] = (int8_t)(dr[k] + t);
}

enum { SPLIT, SIGN, INT16 }; /* the forms: tile, tile_sign, tile16 */

/* The tokens are taken in chunks of about CHUNK_BYTES of codes (a multiple of 8 tokens; 0: all
 * at once), as in w8a8.c: each thread runs its row blocks over one chunk, then the next. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (1024 * 1024)
#endif

static void gemm(const int8_t* packed, const int32_t* zsum, const int32_t* colsum,
                 const float* scale_n, const float* bias, const Acts* A, const float* as,
                 float* y, int64_t M, int64_t N, int64_t Kp, int form)
{
    const int64_t nb = (N + 15) / 16;
    const int64_t row_bytes = form == INT16 ? 2 * Kp : Kp;
    int64_t mc = CHUNK_BYTES > 0 ? ((int64_t)CHUNK_BYTES / row_bytes) & ~(int64_t)7 : M;
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
                const int mt = left >= 4 && form != INT16 ? 4 : (left >= 2 ? 2 : 1);
                if (form == INT16) {
                    if (mt == 2)
                        tile16(pb, zsum, colsum, scale_n, bias, A, y, m0, 2, N, Kp, b);
                    else
                        tile16(pb, zsum, colsum, scale_n, bias, A, y, m0, 1, N, Kp, b);
                } else if (form == SIGN) {
                    if (mt == 4)
                        tile_sign(pb, zsum, colsum, scale_n, bias, A, as, y, m0, 4, N, Kp, b);
                    else if (mt == 2)
                        tile_sign(pb, zsum, colsum, scale_n, bias, A, as, y, m0, 2, N, Kp, b);
                    else
                        tile_sign(pb, zsum, colsum, scale_n, bias, A, as, y, m0, 1, N, Kp, b);
                } else if (mt == 4) {
                    tile(pb, zsum, colsum, scale_n, bias, A, as, y, m0, 4, N, Kp, b);
                } else if (mt == 2) {
                    tile(pb, zsum, colsum, scale_n, bias, A, as, y, m0, 2, N, Kp, b);
                } else {
                    tile(pb, zsum, colsum, scale_n, bias, A, as, y, m0, 1, N, Kp, b);
                }
                m0 += mt;
            }
        }
    }
}

/* The activation side of lq_w8a8: quantize x [M, K] (dynamic: scales into as; static:
 * static_scale and z as in lq_w8a8) and split each token's codes into a (Acts). Returns the
 * number of remainder entries over all tokens, or minus the number of dynamic tokens holding
 * Inf or NaN. Exported for the tests, which check the split itself. */
int64_t lq_w8a8_prepare(const float* x, uint8_t* a, float* as, int64_t M, int64_t K,
                        int64_t Kp, float static_scale, int64_t z)
{
    const int dynamic = !(static_scale > 0.0f);
    const Acts A = acts_at(a, M, Kp);
    const int64_t nq = Kp / 4;
    int64_t bad = 0, nres = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad, nres) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++) {
        int8_t* dr = A.d + m * Kp;
        if (dynamic) {
            if (quantize_token(x + m * K, K, Kp, dr, as + m)) {
                bad++;
                A.nres[m] = 0;
                continue;
            }
        } else {
            quantize_static(x + m * K, K, Kp, dr, static_scale, z);
        }
        A.dsum[m] = split_token(dr, K, Kp, A.ridx + m * nq, A.rpat + m * nq, A.nres + m,
                                A.shift + m);
        nres += A.nres[m];
    }
    return bad ? -bad : nres;
}

/* Which form (SPLIT, SIGN, INT16) a call takes, from lq_w8a8_prepare's count of remainder
 * entries over M tokens of Kp codes; sym: dynamic or static symmetric codes. Per token and chunk
 * the split form issues 7 instructions (plus 7 per remainder), the sign form 9, tile16 about
 * 11: remainders in more than 30% of the chunks cost more than the sign form, past 50% more
 * than tile16. The sign form needs |d| <= 127, so static asymmetric codes take tile16.
 * Exported for the tests. */
int64_t lq_w8a8_form(int64_t nres, int64_t M, int64_t Kp, int64_t sym)
{
    const int64_t chunks = M * (Kp / 4);
    if (sym)
        return 10 * nres > 3 * chunks ? SIGN : SPLIT;
    return 2 * nres > chunks ? INT16 : SPLIT;
}

/* As lq_w8a8 in w8a8.c: the same arguments and results, except that a must hold
 * 5 * M * Kp + 12 * M + 128 bytes (Acts). Returns the number of dynamic tokens holding Inf or
 * NaN (y not computed when there are any). */
int64_t lq_w8a8(const int8_t* packed, const int32_t* colsum, const float* scale_n,
                const float* bias, const float* x, uint8_t* a, float* as, int32_t* zsum,
                float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, float static_scale,
                int64_t z)
{
    const int dynamic = !(static_scale > 0.0f), sym = dynamic || z < 0;
    const int64_t nres = lq_w8a8_prepare(x, a, as, M, K, Kp, static_scale, z);
    if (nres < 0)
        return -nres;
    const Acts A = acts_at(a, M, Kp);
    /* sum (a - zp) w = sum d w - (zp - 128) colsum with d = a - 128 */
    const int64_t nb = (N + 15) / 16;
    const int32_t zp = sym ? 128 : (int32_t)z;
    for (int64_t n = 0; n < nb * 16; n++)
        zsum[n] = (zp - 128) * colsum[n];
    const int form = (int)lq_w8a8_form(nres, M, Kp, sym);
    if (form != SPLIT) {
#pragma omp parallel for schedule(static) if (M * K >= 65536)
        for (int64_t m = 0; m < M; m++) {
            restore_token(&A, m, K, Kp);
            for (int64_t k = 0; form == INT16 && k < Kp; k++)
                A.d16[m * Kp + k] = A.d[m * Kp + k];
        }
    }
    gemm(packed, zsum, colsum, scale_n, bias, &A, dynamic ? as : NULL, y, M, N, Kp, form);
    return 0;
}
