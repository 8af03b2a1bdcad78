/* The engine's CPU kernels (AVX-512 VNNI, or AVX2): the same integers as model.py's torch code.
 *
 * Every result is integer arithmetic (int8 or int16 products summed in int32, int64
 * elsewhere) or one of the IEEE operations the torch code performs on exact float64 integers:
 * a multiply, a division, floor and round-half-to-even. Built with -ffp-contract=off (no
 * FMA contraction) and without -ffast-math, so each of those rounds exactly as torch's does on
 * any machine.
 * cpu_kernels.py compiles this file at first use and probes its GEMM against intops.RowGemm;
 * tests/test_engine.py checks every kernel against the torch code.
 *
 * A kernel that allocates returns 0, or the size in bytes of an allocation that failed (-1:
 * the size overflowed), having freed what it allocated, its output unspecified;
 * cpu_kernels.py raises MemoryError then.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Two instruction sets, one set of integers, both summing exactly in int32: AVX-512 VNNI
 * (dpbusd) multiplies the inputs' int8 halves + 128 (unsigned) by the weights; AVX2 (madd)
 * the whole int16 inputs by the weights widened to int16. The float64 steps are the same
 * IEEE operations in one order. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define AVX512 1
#define INPUT_OFFSET 128 /* added to each GEMM input byte (int8 half) */
#define VW 8             /* float64 lanes of a vector register */
#elif defined(__AVX2__)
#define AVX512 0
#define VW 4
#else
#error "needs AVX-512 F/BW/DQ/VNNI or AVX2"
#endif

/* float64 vectors of VW lanes (GCC/Clang vector extensions: one source for both widths) */
typedef double vdouble __attribute__((vector_size(VW * sizeof(double))));

static inline vdouble vload(const double *p) {
    vdouble v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(double *p, vdouble v) { memcpy(p, &v, sizeof v); }

typedef int64_t i64;

/* torch's thread count (cpu_kernels.py sets it when it changes): OpenMP's own default holds
 * per OS thread, and a kernel called from another Python thread would not follow torch's. */
static int threads = 1;

void set_threads(i64 n) { threads = n > 0 ? (int)n : 1; }

/* Tests: make the n-th allocation from now fail (0: none), to reach every failure path. */
static i64 fail_countdown = 0;

void fail_allocation(i64 n) { __atomic_store_n(&fail_countdown, n, __ATOMIC_SEQ_CST); }

static void *alloc(i64 bytes) {
    if (__atomic_load_n(&fail_countdown, __ATOMIC_RELAXED) > 0 &&
        __atomic_sub_fetch(&fail_countdown, 1, __ATOMIC_SEQ_CST) == 0)
        return NULL;
    if (bytes < 0) return NULL; /* the size overflowed */
    return malloc(bytes > 0 ? (size_t)bytes : 1); /* malloc(0) may be NULL */
}

/* A failed allocation inside a parallel loop: recorded (any one of them; -1: the size
 * overflowed), and the loop goes on (a parallel loop cannot be left early). */
static inline void failed(i64 *status, i64 bytes) {
    __atomic_store_n(status, bytes > 0 ? bytes : -1, __ATOMIC_RELAXED);
}

static inline int32_t bytes4(const void *p) { /* 4 input bytes as one lane (no aliasing) */
    int32_t x;
    memcpy(&x, p, 4);
    return x;
}

static inline i64 floor_div(i64 a, i64 b) { /* b > 0 */
    i64 q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

static inline i64 shr(i64 x, i64 s) { /* torch's >> on int64: shifts past 63 saturate */
    return x >> (s > 63 ? 63 : s);
}

#define KV_BITS 11 /* intops.KV_BITS */

/* intops.round_kv: x rounded to KV_BITS significant bits, ties to even (float16's rounding) */
static inline i64 round_kv(i64 x) {
    uint64_t a = x < 0 ? -(uint64_t)x : (uint64_t)x;
    int drop = 64 - __builtin_clzll(a | 1) - KV_BITS;
    if (drop <= 0) return x;
    uint64_t q = a >> drop, rem = a & (((uint64_t)1 << drop) - 1);
    uint64_t half = (uint64_t)1 << (drop - 1);
    q += rem > half || (rem == half && (q & 1));
    return x < 0 ? -(i64)(q << drop) : (i64)(q << drop);
}

static inline int exponent_of(i64 top) { /* frexp(double(top)).exponent */
    int e;
    frexp((double)top, &e);
    return e;
}

/* The shift that brings a row's largest |x| to at most `bits` bits: max(bit_length(max |x|)
 * - bits, 0), from the row's maximum and minimum as the torch code takes them (aminmax). */
static inline i64 row_shift(const i64 *x, i64 n, int bits) {
    i64 low = x[0], high = x[0];
    for (i64 i = 1; i < n; i++) {
        low = x[i] < low ? x[i] : low;
        high = x[i] > high ? x[i] : high;
    }
    i64 top = high > -low ? high : -low;
    i64 sh = exponent_of(top) - bits;
    return sh < 0 ? 0 : sh;
}

/* -- weights ----------------------------------------------------------------------------- */
/* w int8 [N, K] -> tiles of 16 output channels, each [K4][16][4] (VNNI's layout: 4
 * consecutive k of 16 channels); rowsum [T][16]: each channel's sum (for VNNI's
 * unsigned-input correction). */
void pack_weights(const int8_t *w, i64 n, i64 k, int8_t *packed, int32_t *rowsum) {
    i64 tiles = (n + 15) / 16, k4 = (k + 3) / 4;
    memset(packed, 0, (size_t)(tiles * k4 * 64)); /* padding: weights of 0 */
    memset(rowsum, 0, (size_t)(tiles * 16) * sizeof(int32_t));
    for (i64 c = 0; c < n; c++) {
        const int8_t *row = w + c * k;
        i64 t = c / 16, j = c % 16;
        int8_t *dst = packed + t * k4 * 64;
        int32_t s = 0;
        for (i64 i = 0; i < k; i++) {
            dst[(i / 4) * 64 + j * 4 + (i % 4)] = row[i];
            s += row[i];
        }
        rowsum[t * 16 + j] = s;
    }
}

/* -- GEMM input rows (intops.split_rows) ---------------------------------------------- */
/* q = round(v / 2**k) with |q| <= 2**13, k padded with zeros to kp, *pow2 = 2**k, in 2 kp
 * bytes at row. AVX-512: q = 128 hi + lo (|hi|, |lo| <= 64) as bytes hi + INPUT_OFFSET at
 * row, lo + INPUT_OFFSET at row + kp; AVX2: q itself, int16. */
static void split_row(const i64 *v, i64 k, i64 kp, uint8_t *row, double *pow2) {
    i64 sh = row_shift(v, k, 13);
    i64 half = ((i64)1 << sh) >> 1;
#if AVX512
    uint8_t *hi = row, *lo = row + kp;
    for (i64 i = 0; i < k; i++) {
        i64 q = (v[i] + half) >> sh;
        i64 h = (q + 64) >> 7;
        hi[i] = (uint8_t)(h + INPUT_OFFSET);
        lo[i] = (uint8_t)(q - (h << 7) + INPUT_OFFSET);
    }
    for (i64 i = k; i < kp; i++) hi[i] = lo[i] = INPUT_OFFSET;
#else
    int16_t *q = (int16_t *)row;
    for (i64 i = 0; i < k; i++) q[i] = (int16_t)((v[i] + half) >> sh);
    for (i64 i = k; i < kp; i++) q[i] = 0;
#endif
    *pow2 = ldexp(1.0, (int)sh);
}

/* -- the GEMM and its rescaling ----------------------------------------------------------- */
#if AVX512
static inline __m512d rescale8(__m256i ha, __m256i la, __m512d scale, __m512d pow2) {
    /* 256 ha + 2 la: exact in float64; then * scale (the one rounded product), * 2**k
     * (exact), round half to even: RowGemm.rows' operations in its order. */
    __m512d a = _mm512_mul_pd(_mm512_cvtepi32_pd(ha), _mm512_set1_pd(256.0));
    a = _mm512_add_pd(a, _mm512_mul_pd(_mm512_cvtepi32_pd(la), _mm512_set1_pd(2.0)));
    a = _mm512_mul_pd(a, scale);
    a = _mm512_mul_pd(a, pow2);
    return _mm512_roundscale_pd(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* Rows j < mb of split_row's buffer (row j at rows + 2 kp j) times one tile of 16 output
 * channels, rescaled into out[j, c0 + c]. */
static inline __attribute__((always_inline)) void tile_rows(
    const int8_t *tile, const int32_t *rs, i64 k4, i64 kp, const uint8_t *rows,
    const double *pow2, int mb, const double *scale, const i64 *bias, i64 n, i64 c0, i64 *out,
    i64 ldo) {
    const uint8_t *hi = rows, *lo = rows + kp;
    __m512i ha[8], la[8];
    for (int j = 0; j < mb; j++) ha[j] = la[j] = _mm512_setzero_si512();
    for (i64 q = 0; q < k4; q++) {
        __m512i a = _mm512_loadu_si512(tile + q * 64);
        for (int j = 0; j < mb; j++) {
            __m512i xh = _mm512_set1_epi32(bytes4(hi + 2 * j * kp + q * 4));
            __m512i xl = _mm512_set1_epi32(bytes4(lo + 2 * j * kp + q * 4));
            ha[j] = _mm512_dpbusd_epi32(ha[j], xh, a);
            la[j] = _mm512_dpbusd_epi32(la[j], xl, a);
        }
    }
    /* (x + 128).w = x.w + 128 sum(w) */
    __m512i ca = _mm512_slli_epi32(_mm512_loadu_si512(rs), 7);
    i64 left = n - c0;
    __mmask8 m0 = left >= 8 ? 0xff : (__mmask8)((1u << left) - 1);
    __mmask8 m1 = left >= 16 ? 0xff : (left <= 8 ? 0 : (__mmask8)((1u << (left - 8)) - 1));
    __m512d s0 = _mm512_maskz_loadu_pd(m0, scale + c0), s1 = _mm512_maskz_loadu_pd(m1, scale + c0 + 8);
    __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
    if (bias) {
        b0 = _mm512_maskz_loadu_epi64(m0, bias + c0);
        b1 = _mm512_maskz_loadu_epi64(m1, bias + c0 + 8);
    }
    for (int j = 0; j < mb; j++) {
        __m512i a = _mm512_sub_epi32(ha[j], ca), l = _mm512_sub_epi32(la[j], ca);
        __m512d p = _mm512_set1_pd(pow2[j]);
        __m512d y0 = rescale8(_mm512_castsi512_si256(a), _mm512_castsi512_si256(l), s0, p);
        __m512d y1 = rescale8(_mm512_extracti64x4_epi64(a, 1), _mm512_extracti64x4_epi64(l, 1),
                              s1, p);
        i64 *o = out + j * ldo + c0;
        _mm512_mask_storeu_epi64(o, m0, _mm512_add_epi64(_mm512_cvtpd_epi64(y0), b0));
        _mm512_mask_storeu_epi64(o + 8, m1, _mm512_add_epi64(_mm512_cvtpd_epi64(y1), b1));
    }
}
#else
/* AVX2: whole int16 inputs (|q| <= 2**13) against the weights widened to int16: one madd
 * multiplies 16 pairs and sums each pair in int32, where int8 halves took maddubs and madd
 * for half as many (the multiplies share one or two ports: 1.3-1.4x the GEMM's rate on a
 * Zen EPYC). Per 4 k (the packed tile's unit) and 4 channels, one vector [c][k] of weights
 * times the row's four q broadcast gives each channel two pair sums, added up per channel at
 * the end. |q w| <= 2**20, so a lane's sum over QCHUNK steps is at most 2**29 and a
 * channel's two 2**30: int32 within a chunk, int64 across chunks (any depth). */
#define QCHUNK 256

/* Two accumulators of half_rows' or quad_rows' loop (channels 8h .. 8h + 3 and 8h + 4 ..
 * 8h + 7, two pair sums a channel) added into a row's channel sums s [16]. */
static inline void add_channel_sums(__m256i lo, __m256i hi, int h, i64 *s) {
    static const int at[8] = {0, 1, 4, 5, 2, 3, 6, 7}; /* hadd's order of the channels */
    int32_t c[8];
    _mm256_storeu_si256((__m256i *)c, _mm256_hadd_epi32(lo, hi));
    for (int i = 0; i < 8; i++) s[8 * h + at[i]] += c[i];
}

/* One or two rows (xa, xb: their q) times channels 8h .. 8h + 7 of a tile, added into
 * sa, sb [16]: four accumulators (more spill, and a spilled one costs a store-to-load
 * round trip every step). */
static inline __attribute__((always_inline)) void half_rows(const int8_t *tile, int h, i64 k4,
                                                             const int16_t *xa,
                                                             const int16_t *xb, int two,
                                                             i64 *sa, i64 *sb) {
    for (i64 q0 = 0; q0 < k4; q0 += QCHUNK) {
        i64 q1 = k4 - q0 < QCHUNK ? k4 : q0 + QCHUNK;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
#pragma GCC unroll 2
        for (i64 q = q0; q < q1; q++) {
            const int8_t *w = tile + q * 64 + 32 * h;
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
            __m256i x = _mm256_castpd_si256(_mm256_broadcast_sd((const double *)(xa + q * 4)));
            a0 = _mm256_add_epi32(_mm256_madd_epi16(w0, x), a0);
            a1 = _mm256_add_epi32(_mm256_madd_epi16(w1, x), a1);
            if (two) {
                x = _mm256_castpd_si256(_mm256_broadcast_sd((const double *)(xb + q * 4)));
                b0 = _mm256_add_epi32(_mm256_madd_epi16(w0, x), b0);
                b1 = _mm256_add_epi32(_mm256_madd_epi16(w1, x), b1);
            }
        }
        add_channel_sums(a0, a1, h, sa);
        if (two) add_channel_sums(b0, b1, h, sb);
    }
}

/* tile_rows' rescaling of one row's 16 channel sums, four at a time: the same operations
 * (2 s to float64, * scale, * 2**k, rounded half to even, + bias). AVX2 converts neither way
 * between int64 and float64, so both go through 2**52 + 2**51, exact below 2**51 in
 * magnitude: 2 s always is (|q w| <= 2**20 a product, fewer than 2**30 of them); the rounded
 * products are checked. Returns the channels done: 16, or 0 if a product was out of range
 * (the scalar loop does them). */
static inline int rescale16(const i64 *s, const double *scale, double pow2, const i64 *bias,
                            i64 *o) {
    const __m256d magic = _mm256_set1_pd(6755399441055744.0), limit = _mm256_set1_pd(0x1p51);
    const __m256i magic_bits = _mm256_castpd_si256(magic);
    const __m256d sign = _mm256_set1_pd(-0.0);
    __m256d r[4];
    int big = 0;
    for (int u = 0; u < 4; u++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(s + 4 * u));
        x = _mm256_add_epi64(_mm256_add_epi64(x, x), magic_bits);
        __m256d y = _mm256_sub_pd(_mm256_castsi256_pd(x), magic);
        y = _mm256_mul_pd(_mm256_mul_pd(y, _mm256_loadu_pd(scale + 4 * u)),
                          _mm256_set1_pd(pow2));
        r[u] = _mm256_round_pd(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        big |= _mm256_movemask_pd(_mm256_cmp_pd(_mm256_andnot_pd(sign, r[u]), limit,
                                                _CMP_GE_OQ));
    }
    if (big) return 0;
    for (int u = 0; u < 4; u++) {
        __m256i v = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(r[u], magic)),
                                     magic_bits);
        if (bias) v = _mm256_add_epi64(v, _mm256_loadu_si256((const __m256i *)(bias + 4 * u)));
        _mm256_storeu_si256((__m256i *)(o + 4 * u), v);
    }
    return 16;
}

/* Four rows (x: the first's q, the others kp apart) times channels 8h .. 8h + 7 of a tile,
 * added into s [4][16]: each widened weight vector serves four rows. Written in assembly
 * because GCC, given these eight accumulators as intrinsics, kept one on the stack and copied
 * others back every step (benchmarks/results/engine_dev_cpu.txt); here they stay in
 * registers: 8 accumulators, 2 weight vectors, a broadcast row and 2 products, 13 of 16. */
static inline __attribute__((always_inline)) void quad_rows(const int8_t *tile, int h, i64 k4,
                                                             const int16_t *x, i64 kp,
                                                             i64 (*s)[16]) {
    const i64 stride = 2 * kp; /* bytes from one row to the next */
    for (i64 q0 = 0; q0 < k4; q0 += QCHUNK) {
        i64 q1 = k4 - q0 < QCHUNK ? k4 : q0 + QCHUNK;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                a6 = a0, a7 = a0, w0, w1, xr, t0, t1;
        for (i64 q = q0; q < q1; q++) {
            const int8_t *w = tile + q * 64 + 32 * h;
            const int16_t *r0 = x + q * 4, *r2 = r0 + 2 * kp;
            __asm__("vpmovsxbw (%[w]), %[w0]\n\t"
                    "vpmovsxbw 16(%[w]), %[w1]\n\t"
                    "vpbroadcastq (%[r0]), %[xr]\n\t"
                    "vpmaddwd %[w0], %[xr], %[t0]\n\t"
                    "vpmaddwd %[w1], %[xr], %[t1]\n\t"
                    "vpaddd %[t0], %[a0], %[a0]\n\t"
                    "vpaddd %[t1], %[a1], %[a1]\n\t"
                    "vpbroadcastq (%[r0],%[st]), %[xr]\n\t"
                    "vpmaddwd %[w0], %[xr], %[t0]\n\t"
                    "vpmaddwd %[w1], %[xr], %[t1]\n\t"
                    "vpaddd %[t0], %[a2], %[a2]\n\t"
                    "vpaddd %[t1], %[a3], %[a3]\n\t"
                    "vpbroadcastq (%[r2]), %[xr]\n\t"
                    "vpmaddwd %[w0], %[xr], %[t0]\n\t"
                    "vpmaddwd %[w1], %[xr], %[t1]\n\t"
                    "vpaddd %[t0], %[a4], %[a4]\n\t"
                    "vpaddd %[t1], %[a5], %[a5]\n\t"
                    "vpbroadcastq (%[r2],%[st]), %[xr]\n\t"
                    "vpmaddwd %[w0], %[xr], %[t0]\n\t"
                    "vpmaddwd %[w1], %[xr], %[t1]\n\t"
                    "vpaddd %[t0], %[a6], %[a6]\n\t"
                    "vpaddd %[t1], %[a7], %[a7]"
                    : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3),
                      [a4] "+x"(a4), [a5] "+x"(a5), [a6] "+x"(a6), [a7] "+x"(a7),
                      [w0] "=&x"(w0), [w1] "=&x"(w1), [xr] "=&x"(xr), [t0] "=&x"(t0),
                      [t1] "=&x"(t1)
                    : [w] "r"(w), [r0] "r"(r0), [r2] "r"(r2), [st] "r"(stride)
                    : "memory");
        }
        add_channel_sums(a0, a1, h, s[0]);
        add_channel_sums(a2, a3, h, s[1]);
        add_channel_sums(a4, a5, h, s[2]);
        add_channel_sums(a6, a7, h, s[3]);
    }
}

static inline __attribute__((always_inline)) void tile_rows(
    const int8_t *tile, const int32_t *rs, i64 k4, i64 kp, const uint8_t *rows,
    const double *pow2, int mb, const double *scale, const i64 *bias, i64 n, i64 c0, i64 *out,
    i64 ldo) {
    (void)rs; /* the weights' sums: VNNI's correction */
    const int16_t *x = (const int16_t *)rows; /* row j at x + kp j (2 kp bytes a row) */
    i64 sums[4][16] = {{0}};
    for (int h = 0; h < 2; h++)
        if (mb == 4)
            quad_rows(tile, h, k4, x, kp, sums);
        else
            for (int j = 0; j < mb; j += 2)
                half_rows(tile, h, k4, x + j * kp, x + (j + 1) * kp, mb - j >= 2, sums[j],
                          sums[j + 1]); /* j <= 2 */
    i64 cols = n - c0 < 16 ? n - c0 : 16;
    for (int j = 0; j < mb; j++) {
        i64 *o = out + j * ldo + c0;
        i64 c = cols == 16 ? rescale16(sums[j], scale + c0, pow2[j], bias ? bias + c0 : NULL, o)
                           : 0;
        for (; c < cols; c++) {
            /* 2 q.w = 256 hi.w + 2 lo.w: the AVX-512 rescale8's value (exact in float64),
             * then its two products in its order */
            double y = (double)(2 * sums[j][c]);
            y = y * scale[c0 + c];
            y = y * pow2[j];
            o[c] = (i64)nearbyint(y) + (bias ? bias[c0 + c] : 0);
        }
    }
}
#endif

#define MB 4     /* rows per register block */
#define MBLOCK 256 /* rows per pass over the weights (their 2 kp bytes each stay in L2) */
/* Tiles (16 channels each) a thread runs through for each 4 rows before the next rows: a
 * row's outputs then land GROUP_TILES * 128 bytes at a time, not 128 bytes a row strided by
 * the row's whole width (49,152 channels: 393 KB, a new page for every row and tile). On the
 * 2-core EPYC at 2,048 rows, 2 threads: the head's GEMM (at 128 rows) 28 -> 42-60 GMAC/s,
 * the 3,072-wide gate and up 31 -> 45-50, the others level (4, 8 or 32 tiles: no better). */
#define GROUP_TILES 16

/* out[m, c] = round(2 q.A * scale * 2**k) (+ bias): intops.RowGemm's integers.
 * v int64 [m, k] rows (row stride ldv), out int64 [m, n] (row stride ldo). */
i64 linear(const i64 *v, i64 m, i64 k, i64 ldv, const int8_t *packed, const int32_t *rowsum,
           i64 n, const double *scale, const i64 *bias, i64 *out, i64 ldo) {
    i64 k4 = (k + 3) / 4, kp = k4 * 4, tiles = (n + 15) / 16;
    /* the threads' share of the tiles, in groups of at most GROUP_TILES */
    i64 groups = threads * ((tiles + threads * GROUP_TILES - 1) / (threads * GROUP_TILES));
    i64 per_group = (tiles + groups - 1) / groups;
    i64 rows = m < MBLOCK ? m : MBLOCK;
    i64 row_bytes = 2 * rows * kp + 64;
    i64 pow2_bytes = rows * (i64)sizeof(double);
    uint8_t *buf = alloc(row_bytes);
    double *pow2 = alloc(pow2_bytes);
    if (!buf || !pow2) {
        free(buf);
        free(pow2);
        return buf ? pow2_bytes : row_bytes;
    }
    for (i64 r0 = 0; r0 < m; r0 += MBLOCK) {
        i64 nr = m - r0 < MBLOCK ? m - r0 : MBLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (nr > 8)
        for (i64 r = 0; r < nr; r++)
            split_row(v + (r0 + r) * ldv, k, kp, buf + 2 * r * kp, pow2 + r);
#pragma omp parallel for schedule(static) num_threads(threads)
        for (i64 g = 0; g < groups; g++) {
            i64 t0 = g * per_group, t1 = t0 + per_group < tiles ? t0 + per_group : tiles;
            for (i64 j = 0; j < nr; j += MB) {
                int mb = nr - j < MB ? (int)(nr - j) : MB;
                i64 *o = out + (r0 + j) * ldo;
                const uint8_t *rj = buf + 2 * j * kp;
                for (i64 t = t0; t < t1; t++) {
                    const int8_t *tile = packed + t * k4 * 64;
                    switch (mb) {
#define CASE(x) case x: tile_rows(tile, rowsum + t * 16, k4, kp, rj, pow2 + j, x, scale, bias, n, t * 16, o, ldo); break;
                        CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
                    }
                }
            }
        }
    }
    free(buf);
    free(pow2);
    return 0;
}

/* -- RMS norm (model.rms_norm) -------------------------------------------------------------- */
/* Rows: for i < m and g < groups, the d values at h + i * ldh + g * d (a row of heads). */
void rms_norm(const i64 *h, i64 m, i64 groups, i64 d, i64 ldh, const i64 *gain, i64 s,
              i64 eps32, i64 *out, i64 ldo) {
#pragma omp parallel for schedule(static) num_threads(threads) if (m * groups > 16)
    for (i64 r = 0; r < m * groups; r++) {
        const i64 *x = h + (r / groups) * ldh + (r % groups) * d;
        i64 *y = out + (r / groups) * ldo + (r % groups) * d;
        i64 sh = row_shift(x, d, 20);
        i64 half = ((i64)1 << sh) >> 1, sum = 0;
        for (i64 i = 0; i < d; i++) {
            i64 xs = (x[i] + half) >> sh;
            sum += xs * xs;
        }
        i64 mean = sum / d + shr(eps32, 2 * sh);
        i64 root = (i64)sqrt((double)mean);
        root -= (root * root > mean);
        if (root < 1) root = 1;
        i64 den = s >= 0 ? root : root << (-s);
        for (i64 i = 0; i < d; i++) {
            i64 xs = (x[i] + half) >> sh;
            i64 g2 = s >= 0 ? gain[i] << (s + 1) : gain[i] << 1;
            y[i] = floor_div(xs * g2 + den, den << 1);
        }
    }
}

/* h += delta, or h += rms_norm(delta) (Gemma's post norms: the caller norms delta first). */
void add_rows(i64 *h, const i64 *delta, i64 count) {
    for (i64 i = 0; i < count; i++) h[i] += delta[i];
}

/* -- the MLP's gated activation (model.gated_activation) ------------------------------------- */
void gated_activation(const i64 *gu, i64 m, i64 width, const i64 *table, i64 n2, i64 frac,
                      i64 in_bits, i64 out_bits, i64 *out) {
    i64 n = n2 / 2, shift = frac - in_bits, lim = (i64)1 << 30, big = (i64)1 << 40;
    i64 add = ((i64)1 << (shift - 1)) + (n << shift);
#pragma omp parallel for schedule(static) num_threads(threads) if (m > 4)
    for (i64 r = 0; r < m; r++) {
        const i64 *gate = gu + r * 2 * width, *up = gate + width;
        i64 *y = out + r * width;
        for (i64 i = 0; i < width; i++) {
            i64 x = gate[i];
            i64 idx = (x + add) >> shift;
            idx = idx < 0 ? 0 : (idx > n2 - 1 ? n2 - 1 : idx);
            i64 xc = x < -big ? -big : (x > big ? big : x);
            i64 a = (xc * table[idx] + ((i64)1 << (out_bits - 1))) >> out_bits;
            a = a < -lim ? -lim : (a > lim ? lim : a);
            i64 u = up[i] < -lim ? -lim : (up[i] > lim ? lim : up[i]);
            y[i] = (a * u + ((i64)1 << (frac - 1))) >> frac;
        }
    }
}

/* -- one query's attention (model._attend's integers) ---------------------------------------- */
/* qd [d]: the query as float64; kt: the keys as float64, transposed (key j's element i at
 * kt[i ks + j]); vd: the values as float64 [j d + i]; keys lo..hi, those with ok[j] (ok NULL:
 * all) visible. Scores and weighted sums are float64 sums of exact integer products below
 * 2**53 (exact in any order, as the torch GEMMs' are); the weights, the division and the
 * rounding are _attend's. sc, w [hi + 1] and acc [d]: scratch; o [d]: the output. */
static void attend_row(const double *qd, const double *kt, i64 ks, const double *vd, i64 d,
                       i64 lo, i64 hi, const uint8_t *ok, double *sc, double *w, double *acc,
                       const double *exp_table, i64 n_exp, double index_scale,
                       double out_mult, i64 *o) {
    i64 j0 = lo;
    for (; j0 + 4 * VW <= hi + 1; j0 += 4 * VW) { /* 4 VW scores in registers */
        vdouble a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (i64 i = 0; i < d; i++) {
            const double *row = kt + i * ks + j0;
            a0 += qd[i] * vload(row);
            a1 += qd[i] * vload(row + VW);
            a2 += qd[i] * vload(row + 2 * VW);
            a3 += qd[i] * vload(row + 3 * VW);
        }
        vstore(sc + j0, a0);
        vstore(sc + j0 + VW, a1);
        vstore(sc + j0 + 2 * VW, a2);
        vstore(sc + j0 + 3 * VW, a3);
    }
    for (; j0 + VW <= hi + 1; j0 += VW) { /* then VW at a time */
        vdouble a0 = {0};
        for (i64 i = 0; i < d; i++) a0 += qd[i] * vload(kt + i * ks + j0);
        vstore(sc + j0, a0);
    }
    for (; j0 <= hi; j0++) { /* then one at a time (exact sums: any order) */
        double a = 0.0;
        for (i64 i = 0; i < d; i++) a += qd[i] * kt[i * ks + j0];
        sc[j0] = a;
    }
    double best = -INFINITY, total = 0.0;
    for (i64 j = lo; j <= hi; j++)
        if ((!ok || ok[j]) && sc[j] > best) best = sc[j];
    for (i64 j = lo; j <= hi; j++) {
        double p = 0.0;
        if (!ok || ok[j]) {
            double f = floor((best - sc[j]) * index_scale);
            p = exp_table[f > (double)(n_exp - 1) ? n_exp - 1 : (i64)f];
        }
        w[j] = p;
        total += p;
    }
    for (i64 i = 0; i < d; i++) acc[i] = 0.0;
    for (i64 c = 0; c + 8 * VW <= d; c += 8 * VW) { /* 8 VW columns in registers */
        vdouble a[8];
        for (int u = 0; u < 8; u++) a[u] = (vdouble){0};
        for (i64 j = lo; j <= hi; j++) {
            if (w[j] == 0.0) continue;
            const double *vr = vd + j * d + c;
            for (int u = 0; u < 8; u++) a[u] += w[j] * vload(vr + VW * u);
        }
        for (int u = 0; u < 8; u++) vstore(acc + c + VW * u, a[u]);
    }
    for (i64 j = lo; j <= hi && d % (8 * VW); j++) { /* the columns past the last block */
        double p = w[j];
        if (p == 0.0) continue;
        const double *vr = vd + j * d;
        for (i64 i = d - d % (8 * VW); i < d; i++) acc[i] += p * vr[i];
    }
    for (i64 i = 0; i < d; i++) o[i] = (i64)nearbyint((acc[i] * out_mult) / total);
}

/* -- rotary embedding and the values' rounding (model._heads) ------------------------------- */
/* One head's row x [d] (Q16) rotated at the position of tables c, sn [d] (model._rotate's
 * integers: x [cos | cos] + [x2 | x1] [-sin | sin], rounded by rope_shift, clamped). */
static inline void rotate_head(const i64 *x, const i64 *c, const i64 *sn, i64 d, i64 rope_shift,
                               i64 limit, i64 *rot) {
    i64 half = d / 2, big = (i64)1 << 40, rnd = (i64)1 << (rope_shift - 1);
    for (i64 i = 0; i < d; i++) {
        i64 xi = x[i], xs = x[i < half ? i + half : i - half];
        xi = xi < -big ? -big : (xi > big ? big : xi);
        xs = xs < -big ? -big : (xs > big ? big : xs);
        i64 y = (xi * c[i] + xs * sn[i] + rnd) >> rope_shift;
        rot[i] = y < -limit ? -limit : (y > limit ? limit : y);
    }
}

/* A value (Q16) as the cache holds it: rshift_round(x, vshift), clamped, round_kv. */
static inline i64 cached_value(i64 x, i64 vshift, i64 limit) {
    i64 y = (x + ((i64)1 << (vshift - 1))) >> vshift;
    return round_kv(y < -limit ? -limit : (y > limit ? limit : y));
}

/* A prefill's heads: qkv int64 [b, t, (h + 2 kv) d] (queries and keys normed where the model
 * does) at positions pos [b, t] as rotated queries q [b, kv, rep, t, d] and keys and values
 * [b, kv, t, d] rounded as caches hold them (round_kv), all int64: model._heads' integers. */
void prefill_heads(const i64 *qkv, i64 b, i64 t, i64 heads, i64 kv, i64 d, const i64 *pos,
                   const i64 *cosf, const i64 *sinf, i64 rope_shift, i64 vshift, i64 limit,
                   i64 *q, i64 *k, i64 *v) {
    i64 width = (heads + 2 * kv) * d, rep = heads / kv;
#pragma omp parallel for schedule(static) num_threads(threads) if (b * t > 8)
    for (i64 r = 0; r < b * t; r++) {
        i64 s = r / t, tt = r % t, p = pos[r];
        const i64 *row = qkv + r * width, *c = cosf + p * d, *sn = sinf + p * d;
        for (i64 hh = 0; hh < heads; hh++)
            rotate_head(row + hh * d, c, sn, d, rope_shift, limit,
                        q + (((s * kv + hh / rep) * rep + hh % rep) * t + tt) * d);
        for (i64 g = 0; g < kv; g++) {
            i64 *kd = k + ((s * kv + g) * t + tt) * d, *vd = v + ((s * kv + g) * t + tt) * d;
            const i64 *x = row + (heads + kv + g) * d;
            rotate_head(row + (heads + g) * d, c, sn, d, rope_shift, limit, kd);
            for (i64 i = 0; i < d; i++) {
                kd[i] = round_kv(kd[i]);
                vd[i] = cached_value(x[i], vshift, limit);
            }
        }
    }
}

/* -- one decode step's attention ------------------------------------------------------------ */
/* qkv int64 [b, (h + 2 kv) d] (queries and keys already normed where the model does), rotated
 * at each stream's position (model._rotate), keys and values (rshift_round(v, frac - 12),
 * clamped) rounded (round_kv) and written into the int32 caches [b, kv, cap, d] there, and
 * the softmax attention of the rotated queries over keys lo..pos (model._attend) into out
 * int64 [b, h d]: attend_row, with each key head's keys and values made float64 once for its
 * rep query heads. */
i64 decode_attention(const i64 *qkv, i64 b, i64 heads, i64 kv, i64 d, const i64 *pos,
                     const i64 *cosf, const i64 *sinf, i64 rope_shift, i64 vshift, i64 limit,
                     int32_t *kc, int32_t *vc, i64 cap, i64 window, const double *exp_table,
                     i64 n_exp, double index_scale, double out_mult, i64 *out, i64 *work) {
    i64 status = 0;
    i64 width = (heads + 2 * kv) * d;
    /* rotated queries [b, heads, d] as float64 (|q| <= limit < 2**53: exact), attend_row's */
    double *qr = (double *)work;
    for (i64 s = 0; s < b; s++) {
        i64 p = pos[s];
        const i64 *c = cosf + p * d, *sn = sinf + p * d;
        for (i64 hh = 0; hh < heads + kv; hh++) {
            i64 rot[512];
            rotate_head(qkv + s * width + hh * d, c, sn, d, rope_shift, limit, rot);
            if (hh < heads) {
                double *qd = qr + (s * heads + hh) * d;
                for (i64 i = 0; i < d; i++) qd[i] = (double)rot[i];
            } else {
                int32_t *kd = kc + ((s * kv + (hh - heads)) * cap + p) * d;
                for (i64 i = 0; i < d; i++) kd[i] = (int32_t)round_kv(rot[i]);
            }
        }
        for (i64 g = 0; g < kv; g++) {
            const i64 *x = qkv + s * width + (heads + kv + g) * d;
            int32_t *vd = vc + ((s * kv + g) * cap + p) * d;
            for (i64 i = 0; i < d; i++) vd[i] = (int32_t)cached_value(x[i], vshift, limit);
        }
    }
    i64 rep = heads / kv, keys = 0;
    for (i64 s = 0; s < b; s++) keys += pos[s] + 1;
    /* threads only where there is work for them (~32k products): one stream's step uses
     * both cores from ~60 keys on (on the 2-core EPYC at position 200, 3.3 -> 1.4 ms a step) */
#pragma omp parallel for schedule(static) num_threads(threads) if (keys * heads * d > (1 << 15))
    for (i64 sg = 0; sg < b * kv; sg++) { /* a stream's key head and its rep query heads */
        i64 s = sg / kv, g = sg % kv, p = pos[s];
        i64 lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0, n = p + 1 - lo;
        i64 bytes = (2 * n * d + 2 * n + d) * (i64)sizeof(double);
        double *kt = alloc(bytes);
        if (!kt) {
            failed(&status, bytes);
            continue;
        }
        double *vd = kt + n * d, *sc = vd + n * d, *w = sc + n, *acc = w + n;
        const int32_t *kb = kc + (sg * cap + lo) * d, *vb = vc + (sg * cap + lo) * d;
        for (i64 j = 0; j < n; j++) /* as float64 once for the rep query heads */
            for (i64 i = 0; i < d; i++) {
                kt[i * n + j] = (double)kb[j * d + i];
                vd[j * d + i] = (double)vb[j * d + i];
            }
        for (i64 hh = g * rep; hh < (g + 1) * rep; hh++)
            attend_row(qr + (s * heads + hh) * d, kt, n, vd, d, 0, n - 1, NULL, sc, w, acc,
                       exp_table, n_exp, index_scale, out_mult, out + (s * heads + hh) * d);
        free(kt);
    }
    return status;
}

/* -- the distribution (IntModel.pmf / intervals) --------------------------------------------- */
/* freq_plus_one of one row of logits: floor(p budget / sum p) + 1 for every token, p the exp
 * table at the rounded distance to the max; returns the argmax (first) and the remainder. */
static void row_freq(const i64 *x, i64 v, const i64 *exp_prob, i64 n_exp, i64 shift,
                     i64 budget, i64 total_all, i64 *freq, i64 *argmax, i64 *remainder) {
    i64 best = x[0], top = 0;
    for (i64 i = 1; i < v; i++)
        if (x[i] > best) best = x[i], top = i;
    i64 add = best + ((i64)1 << (shift - 1)), sum = 0;
    for (i64 i = 0; i < v; i++) {
        i64 idx = (add - x[i]) >> shift;
        idx = idx > n_exp - 1 ? n_exp - 1 : idx;
        freq[i] = exp_prob[idx];
        sum += freq[i];
    }
    i64 used = 0;
    for (i64 i = 0; i < v; i++) {
        freq[i] = (sum + freq[i] * budget) / sum;
        used += freq[i];
    }
    *argmax = top;
    *remainder = total_all - 2 - used;
}

/* pmf [m, v + 2]: 1, the frequencies (the argmax's plus the remainder), 1. */
void pmf_rows(const i64 *logits, i64 m, i64 v, i64 ld, const i64 *exp_prob, i64 n_exp,
              i64 shift, i64 total_all, i64 *out) {
    i64 budget = total_all - (v + 2);
#pragma omp parallel for schedule(static) num_threads(threads) if (m > 1)
    for (i64 r = 0; r < m; r++) {
        i64 *o = out + r * (v + 2), top, rem;
        row_freq(logits + r * ld, v, exp_prob, n_exp, shift, budget, total_all, o + 1, &top, &rem);
        o[0] = 1;
        o[v + 1] = 1;
        o[top + 1] += rem;
    }
}

/* (start, freq) of token t[r] in each row's pmf: IntModel.intervals. */
i64 interval_rows(const i64 *logits, i64 m, i64 v, i64 ld, const i64 *tokens,
                  const i64 *exp_prob, i64 n_exp, i64 shift, i64 total_all, i64 *start,
                  i64 *freq) {
    i64 budget = total_all - (v + 2), status = 0;
#pragma omp parallel num_threads(threads) if (m > 1)
    {
        i64 *f = alloc(v * (i64)sizeof(i64));
        if (!f) failed(&status, v * (i64)sizeof(i64));
        /* every thread still reaches the loop (a worksharing construct): it skips its rows */
#pragma omp for schedule(static)
        for (i64 r = 0; r < m; r++) {
            if (!f) continue;
            i64 top, rem, t = tokens[r], below = 0;
            row_freq(logits + r * ld, v, exp_prob, n_exp, shift, budget, total_all, f, &top,
                     &rem);
            for (i64 i = 0; i < t; i++) below += f[i];
            freq[r] = f[t] + (top == t ? rem : 0);
            start[r] = below + 1 + (top < t ? rem : 0);
        }
        free(f);
    }
    return status;
}

/* -- residual add, norm and GEMM in one call (model's norm_linear) ------------------------------ */
/* h [m, k] += delta (first normed by the post norm where post_gain is given; delta may be
 * NULL), then out = linear(rms_norm(h)); tmp: int64 [m, k] scratch. */
i64 norm_linear(i64 *h, const i64 *delta, i64 m, i64 k, const i64 *post_gain, i64 post_s,
                i64 post_eps, const i64 *gain, i64 s, i64 eps32, const int8_t *packed,
                const int32_t *rowsum, i64 n, const double *scale, const i64 *bias, i64 *out,
                i64 *tmp) {
    if (delta) {
        if (post_gain) {
            rms_norm(delta, m, 1, k, k, post_gain, post_s, post_eps, tmp, k);
            delta = tmp;
        }
        add_rows(h, delta, m * k);
    }
    rms_norm(h, m, 1, k, k, gain, s, eps32, tmp, k);
    return linear(tmp, m, k, k, packed, rowsum, n, scale, bias, out, n);
}

/* -- a prefill's attention (model._attend) -------------------------------------------------- */
/* q int64 [b, kv, rep, t, d], k and v int64 [b, kv, s, d] (contiguous), mask [b, t, s] (1 where
 * visible) -> out int64 [b, t, kv * rep * d]: attend_row for each query over its key head's
 * keys and values, made float64 once per key head. */
i64 prefill_attention(const i64 *q, const i64 *k, const i64 *v, i64 b, i64 kv, i64 rep, i64 t,
                      i64 s, i64 d, const uint8_t *mask, const double *exp_table, i64 n_exp,
                      double index_scale, double out_mult, i64 *out) {
    i64 status = 0, bytes = (2 * s * d + 2 * s + 2 * d) * (i64)sizeof(double);
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (b * kv > 1)
    for (i64 bg = 0; bg < b * kv; bg++) {
        i64 bi = bg / kv, g = bg % kv;
        double *kt = alloc(bytes);
        if (!kt) {
            failed(&status, bytes);
            continue;
        }
        double *vd = kt + s * d, *sc = vd + s * d, *w = sc + s, *acc = w + s, *qd = acc + d;
        const i64 *kb = k + bg * s * d, *vb = v + bg * s * d;
        for (i64 j = 0; j < s; j++)
            for (i64 i = 0; i < d; i++) {
                kt[i * s + j] = (double)kb[j * d + i];
                vd[j * d + i] = (double)vb[j * d + i];
            }
        for (i64 r = 0; r < rep; r++)
            for (i64 tt = 0; tt < t; tt++) {
                const i64 *qr = q + (((bg * rep) + r) * t + tt) * d;
                const uint8_t *ok = mask + (bi * t + tt) * s;
                i64 lo = 0, hi = s - 1;
                while (lo < s && !ok[lo]) lo++;
                while (hi >= lo && !ok[hi]) hi--;
                i64 *o = out + (bi * t + tt) * kv * rep * d + (g * rep + r) * d;
                if (lo > hi) { /* nothing visible: _attend's 0 / 0 never arises in the engine */
                    for (i64 i = 0; i < d; i++) o[i] = 0;
                    continue;
                }
                for (i64 i = 0; i < d; i++) qd[i] = (double)qr[i];
                attend_row(qd, kt, s, vd, d, lo, hi, ok, sc, w, acc, exp_table, n_exp,
                           index_scale, out_mult, o);
            }
        free(kt);
    }
    return status;
}
