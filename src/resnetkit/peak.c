/* The peak arithmetic rate of one core, measured: twelve independent chains of the widest
 * multiply-add instruction the build flags allow (the caller passes only the instruction
 * sets that this CPU has and that oneDNN may use). Twelve chains hide the instruction's
 * latency on every x86 core with two multiply-add units (latency 4-6 cycles), so the loop
 * runs at the units' throughput. Each function runs `iters` iterations and returns the
 * operations done (a multiply-add counts two), or 0 where the instruction was not built in.
 */
#include <immintrin.h>

#define REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

static volatile float float_sink;
static volatile int int_sink;

double fp32_fma(long iters, float seed)
{
#if defined(__AVX512F__)
    __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
#define DECL(i) __m512 a##i = _mm512_set1_ps(seed + (float)i);
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, m, c);
#define SUM(i) s = _mm512_add_ps(s, a##i);
    REP12(DECL)
    for (long n = 0; n < iters; n++) {
        REP12(STEP)
    }
    __m512 s = _mm512_setzero_ps();
    REP12(SUM)
    float_sink = _mm512_reduce_add_ps(s);
    return (double)iters * 12 * 16 * 2;
#undef DECL
#undef STEP
#undef SUM
#elif defined(__FMA__)
    __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
#define DECL(i) __m256 a##i = _mm256_set1_ps(seed + (float)i);
#define STEP(i) a##i = _mm256_fmadd_ps(a##i, m, c);
#define SUM(i) s = _mm256_add_ps(s, a##i);
    REP12(DECL)
    for (long n = 0; n < iters; n++) {
        REP12(STEP)
    }
    __m256 s = _mm256_setzero_ps();
    REP12(SUM)
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float_sink = lanes[0] + lanes[7];
    return (double)iters * 12 * 8 * 2;
#undef DECL
#undef STEP
#undef SUM
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
#define DECL(i) __m512 a##i = _mm512_set1_ps((float)i);
#define STEP(i) a##i = _mm512_dpbf16_ps(a##i, p, q);
#define SUM(i) s = _mm512_add_ps(s, a##i);
    REP12(DECL)
    for (long n = 0; n < iters; n++) {
        REP12(STEP)
    }
    __m512 s = _mm512_setzero_ps();
    REP12(SUM)
    float_sink = _mm512_reduce_add_ps(s);
    return (double)iters * 12 * 16 * 4;
#undef DECL
#undef STEP
#undef SUM
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
#define DECL(i) __m512i a##i = _mm512_set1_epi32(i);
#define STEP(i) a##i = _mm512_dpbusd_epi32(a##i, p, q);
#define SUM(i) s = _mm512_add_epi32(s, a##i);
    REP12(DECL)
    for (long n = 0; n < iters; n++) {
        REP12(STEP)
    }
    __m512i s = _mm512_setzero_si512();
    REP12(SUM)
    int_sink = _mm512_reduce_add_epi32(s);
    return (double)iters * 12 * 16 * 8;
#undef DECL
#undef STEP
#undef SUM
#elif defined(__AVXVNNI__)
    __m256i p = _mm256_set1_epi32(seed), q = _mm256_set1_epi32(seed ^ 0x01020304);
#define DECL(i) __m256i a##i = _mm256_set1_epi32(i);
#define STEP(i) a##i = _mm256_dpbusd_avx_epi32(a##i, p, q);
#define SUM(i) s = _mm256_add_epi32(s, a##i);
    REP12(DECL)
    for (long n = 0; n < iters; n++) {
        REP12(STEP)
    }
    __m256i s = _mm256_setzero_si256();
    REP12(SUM)
    int lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, s);
    int_sink = lanes[0] + lanes[7];
    return (double)iters * 12 * 8 * 8;
#undef DECL
#undef STEP
#undef SUM
#else
    (void)iters; (void)seed;
    return 0;
#endif
}
