/* The peak arithmetic rate of one core, measured: independent chains of the widest
 * multiply-add instruction the build flags allow (the caller passes only the instruction
 * sets that this CPU has and that oneDNN may use), as many as the registers hold: sixteen
 * of AVX-512's 32 registers, twelve of AVX2's 16. Chains hide the instruction's latency only
 * where there are at least latency x units of them: twelve were too few for AVX512-BF16's
 * dot product on AMD's Zen 5 (449 against 484 GFLOP/s a core with sixteen), so the loop
 * runs at the units' throughput with sixteen. Each function runs `iters` iterations and returns the
 * operations done (a multiply-add counts two), or 0 where the instruction was not built in.
 */
#include <immintrin.h>

static volatile float float_sink;
static volatile int int_sink;

/* Twelve chains a0..a11 of type ACC started at INIT(i), each stepped by STEP(a) `iters`
 * times, then summed lane-wise with ADD from ZERO and handed to FINISH (so that the
 * compiler cannot drop the loop); CHAINS16 the same with sixteen. */
#define CHAINS(ACC, INIT, STEP, ADD, ZERO, FINISH)                                        \
    ACC a0 = INIT(0), a1 = INIT(1), a2 = INIT(2), a3 = INIT(3), a4 = INIT(4),             \
        a5 = INIT(5), a6 = INIT(6), a7 = INIT(7), a8 = INIT(8), a9 = INIT(9),              \
        a10 = INIT(10), a11 = INIT(11);                                                    \
    for (long n = 0; n < iters; n++) {                                                     \
        a0 = STEP(a0); a1 = STEP(a1); a2 = STEP(a2); a3 = STEP(a3); a4 = STEP(a4);         \
        a5 = STEP(a5); a6 = STEP(a6); a7 = STEP(a7); a8 = STEP(a8); a9 = STEP(a9);         \
        a10 = STEP(a10); a11 = STEP(a11);                                                  \
    }                                                                                      \
    FINISH(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ZERO, a0), a1), a2), a3), a4),  \
           a5), a6), a7), a8), a9), a10), a11))

#define CHAINS16(ACC, INIT, STEP, ADD, ZERO, FINISH)                                      \
    ACC a0 = INIT(0), a1 = INIT(1), a2 = INIT(2), a3 = INIT(3), a4 = INIT(4),             \
        a5 = INIT(5), a6 = INIT(6), a7 = INIT(7), a8 = INIT(8), a9 = INIT(9),              \
        a10 = INIT(10), a11 = INIT(11), a12 = INIT(12), a13 = INIT(13), a14 = INIT(14),    \
        a15 = INIT(15);                                                                    \
    for (long n = 0; n < iters; n++) {                                                     \
        a0 = STEP(a0); a1 = STEP(a1); a2 = STEP(a2); a3 = STEP(a3); a4 = STEP(a4);         \
        a5 = STEP(a5); a6 = STEP(a6); a7 = STEP(a7); a8 = STEP(a8); a9 = STEP(a9);         \
        a10 = STEP(a10); a11 = STEP(a11); a12 = STEP(a12); a13 = STEP(a13);                \
        a14 = STEP(a14); a15 = STEP(a15);                                                  \
    }                                                                                      \
    FINISH(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ADD(ZERO, a0), a1), \
           a2), a3), a4), a5), a6), a7), a8), a9), a10), a11), a12), a13), a14), a15))

#if defined(__AVX2__)
static inline void finish256(__m256 s)
{
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float_sink = lanes[0] + lanes[7];
}

static inline void finish256i(__m256i s)
{
    int lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, s);
    int_sink = lanes[0] + lanes[7];
}
#endif

#if defined(__AVX512F__)
static inline void finish512(__m512 s) { float_sink = _mm512_reduce_add_ps(s); }
static inline void finish512i(__m512i s) { int_sink = _mm512_reduce_add_epi32(s); }
#endif

double fp32_fma(long iters, float seed)
{
#if defined(__AVX512F__)
    __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
#define INIT(i) _mm512_set1_ps(seed + (float)(i))
#define STEP(a) _mm512_fmadd_ps(a, m, c)
    CHAINS16(__m512, INIT, STEP, _mm512_add_ps, _mm512_setzero_ps(), finish512);
#undef INIT
#undef STEP
    return (double)iters * 16 * 16 * 2;
#elif defined(__FMA__)
    __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
#define INIT(i) _mm256_set1_ps(seed + (float)(i))
#define STEP(a) _mm256_fmadd_ps(a, m, c)
    CHAINS(__m256, INIT, STEP, _mm256_add_ps, _mm256_setzero_ps(), finish256);
#undef INIT
#undef STEP
    return (double)iters * 12 * 8 * 2;
#else
    (void)iters; (void)seed;
    return 0;
#endif
}

/* vdpbf16ps: per 32-bit lane, two bf16 products added to an fp32 sum (4 FLOP). */
double bf16_dot(long iters, float seed)
{
#if defined(__AVX512BF16__)
    __m512 x = _mm512_set1_ps(seed);
    __m512bh p = _mm512_cvtne2ps_pbh(x, x), q = _mm512_cvtne2ps_pbh(x, x);
#define INIT(i) _mm512_set1_ps((float)(i))
#define STEP(a) _mm512_dpbf16_ps(a, p, q)
    CHAINS16(__m512, INIT, STEP, _mm512_add_ps, _mm512_setzero_ps(), finish512);
#undef INIT
#undef STEP
    return (double)iters * 16 * 16 * 4;
#else
    (void)iters; (void)seed;
    return 0;
#endif
}

/* vpdpbusd: per 32-bit lane, four u8 x s8 products added to an int32 sum (8 operations). */
double int8_dot(long iters, int seed)
{
#if defined(__AVX512VNNI__)
    __m512i p = _mm512_set1_epi32(seed), q = _mm512_set1_epi32(seed ^ 0x01020304);
#define INIT(i) _mm512_set1_epi32(i)
#define STEP(a) _mm512_dpbusd_epi32(a, p, q)
    CHAINS16(__m512i, INIT, STEP, _mm512_add_epi32, _mm512_setzero_si512(), finish512i);
#undef INIT
#undef STEP
    return (double)iters * 16 * 16 * 8;
#elif defined(__AVXVNNI__)
    __m256i p = _mm256_set1_epi32(seed), q = _mm256_set1_epi32(seed ^ 0x01020304);
#define INIT(i) _mm256_set1_epi32(i)
#define STEP(a) _mm256_dpbusd_avx_epi32(a, p, q)
    CHAINS(__m256i, INIT, STEP, _mm256_add_epi32, _mm256_setzero_si256(), finish256i);
#undef INIT
#undef STEP
    return (double)iters * 12 * 8 * 8;
#else
    (void)iters; (void)seed;
    return 0;
#endif
}
