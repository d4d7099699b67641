
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 512

int snn_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline int snn_tid(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Lean storage of activations whose values are k/d, k in 0..255 (spikes, pooled spikes):
   write k as uint8. Returns 1 on success, 0 as soon as a value does not fit. */
int pack_u8_f32(const float* x, int64_t n, uint8_t* out, float d, int nthreads) {
    int ok = 1;
    int64_t nchunks = (n + 65535) / 65536;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nchunks; ++c) {
        if (!__atomic_load_n(&ok, __ATOMIC_RELAXED)) continue;
        int64_t a = c * 65536, b = a + 65536 < n ? a + 65536 : n;
        int bad = 0;
        for (int64_t i = a; i < b; ++i) {
            float q = x[i] * d;
            int k = (int)q;
            bad |= (q != (float)k) | (k < 0) | (k > 255);
            out[i] = (uint8_t)k;
        }
        if (bad) __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
    }
    return ok;
}
