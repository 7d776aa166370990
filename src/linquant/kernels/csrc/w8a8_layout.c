/* linquant: the weight layout of the W8A8 kernels (w8a8.c: AVX512-VNNI; w8a8_avx2.c: AVX2),
 * compiled into both libraries with them (see native.py: a library's extra sources). Plain C.
 * Built once per layer, on its first call; 8-10x faster than the same with PyTorch ops. */
#include <stdint.h>
#include <string.h>

/* src int8 [N, K]; dst [ceil(N / 16), Kp / 4, 16, 4], the 4 codes k = 4c .. 4c + 3 of row
 * 16b + i at dst[b][c][i], K padded by zeros to Kp (a multiple of 4) and rows past N zero;
 * colsum [ceil(N / 16) * 16]: each row's sum of its codes. */
int64_t lq_w8a8_repack(const int8_t* src, int8_t* dst, int32_t* colsum, int64_t N, int64_t K,
                       int64_t Kp)
{
    const int64_t nb = (N + 15) / 16, C = Kp / 4, full = K / 4;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 20))
    for (int64_t b = 0; b < nb; b++) {
        int8_t* out = dst + b * C * 64;
        for (int i = 0; i < 16; i++) {
            const int64_t row = b * 16 + i;
            if (row >= N) {
                for (int64_t c = 0; c < C; c++)
                    memset(out + c * 64 + i * 4, 0, 4);
                colsum[row] = 0;
                continue;
            }
            const int8_t* r = src + row * K;
            int32_t sum = 0;
            for (int64_t k = 0; k < K; k++)
                sum += r[k];
            colsum[row] = sum;
            for (int64_t c = 0; c < full; c++)
                memcpy(out + c * 64 + i * 4, r + c * 4, 4);
            if (full < C) { /* the last, padded chunk */
                int8_t tail[4] = {0, 0, 0, 0};
                memcpy(tail, r + full * 4, (size_t)(K - full * 4));
                memcpy(out + full * 64 + i * 4, tail, 4);
            }
        }
    }
    return 0;
}
