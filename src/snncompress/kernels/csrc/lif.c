
/* Per-element leak / threshold / channel index of a tile of L elements starting at n0.
   Element n of a timestep has channel (n / S) % C (C = 1 for scalar parameters). */
static inline void gather_SUF(const SCALAR* leak, const SCALAR* thr, int64_t n0, int64_t L,
                              int64_t C, int64_t S, SCALAR* lk, SCALAR* th, int32_t* ch) {
    int64_t c = (n0 / S) % C, s = n0 % S;
    /* Fill runs of one channel at a time: a constant fill vectorises, an element-wise
       channel counter does not (it cost ~3 ns per element, more than the T = 1 update). */
    for (int64_t i = 0; i < L;) {
        int64_t run = S - s < L - i ? S - s : L - i;
        const SCALAR a = leak[c], b = thr[c];
        for (int64_t k = i; k < i + run; ++k) { lk[k] = a; th[k] = b; ch[k] = (int32_t)c; }
        i += run; s = 0;
        if (++c == C) c = 0;
    }
}

/* One tile, all timesteps. HARD and SAVE are compile-time constants at every call site,
   so each combination gets its own branch-free vector loop. */
static inline __attribute__((always_inline)) void fwd_tile_SUF(
        const SCALAR* restrict I, int64_t its, SCALAR* restrict out, SCALAR* restrict usave,
        const SCALAR* restrict lk, const SCALAR* restrict th, int64_t Tn, int64_t N,
        int64_t n0, int64_t L, const int HARD, const int SAVE) {
    SCALAR h[TILE];
    for (int64_t i = 0; i < L; ++i) h[i] = 0;
    for (int64_t t = 0; t < Tn; ++t) {
        const SCALAR* restrict it = I + t * its + n0;
        SCALAR* restrict ot = out + t * N + n0;
        SCALAR* restrict ut = SAVE ? usave + t * N + n0 : 0;
        for (int64_t i = 0; i < L; ++i) {
            SCALAR u = lk[i] * h[i]; u = u + it[i];         /* two roundings, as the reference */
            SCALAR z = u / th[i] - (SCALAR)1;
            SCALAR o = z >= (SCALAR)0 ? (SCALAR)1 : (SCALAR)0;
            ot[i] = o;
            if (SAVE) ut[i] = u;
            h[i] = HARD ? u * ((SCALAR)1 - o) : u - th[i] * o;
        }
    }
}

/* Forward. I[t] at I + t*its (its = 0: input broadcast over time); out, usave [T, N];
   usave NULL: nothing is saved (inference). */
void lif_fwd_SUF(const SCALAR* I, int64_t its, SCALAR* out, SCALAR* usave,
                 const SCALAR* leak, const SCALAR* thr,
                 int64_t Tn, int64_t N, int64_t C, int64_t S, int hard, int nthreads) {
    int64_t ntiles = (N + TILE - 1) / TILE;
    int mode = (hard ? 2 : 0) + (usave ? 1 : 0);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
        SCALAR lk[TILE], th[TILE]; int32_t ch[TILE];
        int64_t n0 = tile * TILE, L = N - n0 < TILE ? N - n0 : TILE;
        gather_SUF(leak, thr, n0, L, C, S, lk, th, ch);
        switch (mode) {
            case 0: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 0, 0); break;
            case 1: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 0, 1); break;
            case 2: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 1, 0); break;
            default: fwd_tile_SUF(I, its, out, usave, lk, th, Tn, N, n0, L, 1, 1); break;
        }
    }
}

/* Surrogate derivative at z; KIND 0 linear, 1 atan, 2 fast sigmoid (neuron.surrogate_grad). */
static inline __attribute__((always_inline)) SCALAR surr_SUF(SCALAR z, const int KIND, SCALAR s) {
    if (KIND == 0) { SCALAR a = z < 0 ? -z : z; SCALAR v = (SCALAR)1 - a; return v > 0 ? s * v : (SCALAR)0; }
    if (KIND == 1) { SCALAR q = (SCALAR)1.5707963267948966 * s * z; return (s / (SCALAR)2) / ((SCALAR)1 + q * q); }
    { SCALAR a = z < 0 ? -z : z; SCALAR d = (SCALAR)1 + s * a; return (SCALAR)1 / (d * d); }
}

/* Backward of one tile: t = T-1 .. 0 with carry = dL/dh[t] = leak * dL/du[t+1].
   u[t-1] is read once per step and kept for the next one (z recomputed exactly). */
static inline __attribute__((always_inline)) void bwd_tile_SUF(
        const SCALAR* restrict G, int64_t gts, const SCALAR* restrict U, SCALAR* restrict dI,
        const SCALAR* restrict lk, const SCALAR* restrict th, SCALAR* restrict al,
        SCALAR* restrict at, int64_t Tn, int64_t N, int64_t n0, int64_t L, SCALAR s,
        const int HARD, const int KIND, const int SUMT) {
    SCALAR rt[TILE], carry[TILE], zc[TILE], uc[TILE], ds[TILE];
    const SCALAR* restrict ul = U + (Tn - 1) * N + n0;
    for (int64_t i = 0; i < L; ++i) {
        rt[i] = (SCALAR)1 / th[i]; carry[i] = 0; al[i] = 0; at[i] = 0; ds[i] = 0;
        uc[i] = ul[i]; zc[i] = ul[i] / th[i] - (SCALAR)1;
    }
    for (int64_t t = Tn - 1; t >= 0; --t) {
        const SCALAR* restrict gt = G + t * gts + n0;
        SCALAR* restrict dt = dI + (SUMT ? 0 : t * N) + n0;
        const SCALAR* restrict up = U + (t > 0 ? t - 1 : 0) * N + n0;
        const int prev = t > 0;
        for (int64_t i = 0; i < L; ++i) {
            SCALAR u = uc[i], z = zc[i], the = th[i], r = rt[i];
            SCALAR o = z >= (SCALAR)0 ? (SCALAR)1 : (SCALAR)0;
            SCALAR gz = gt[i] * surr_SUF(z, KIND, s) * r;        /* dL/du through the spike */
            SCALAR du = gz + (HARD ? carry[i] * ((SCALAR)1 - o) : carry[i]);
            if (SUMT) ds[i] += du; else dt[i] = du;
            at[i] -= gz * u * r + (HARD ? (SCALAR)0 : carry[i] * o);
            carry[i] = lk[i] * du;
            SCALAR upv = up[i]; SCALAR zp = upv / the - (SCALAR)1;
            SCALAR op = zp >= (SCALAR)0 ? (SCALAR)1 : (SCALAR)0;
            SCALAR hp = HARD ? upv * ((SCALAR)1 - op) : upv - the * op;
            al[i] += prev ? du * hp : (SCALAR)0;
            uc[i] = upv; zc[i] = zp;
        }
    }
    if (SUMT) { SCALAR* restrict d0 = dI + n0; for (int64_t i = 0; i < L; ++i) d0[i] = ds[i]; }
}

/* k x k average pooling with stride k, no padding, floor mode, on P contiguous planes
   [H, W] -> [H/k, W/k]. Same summation order as PyTorch's kernel (row by row, then one
   division by k*k), so results are bit-identical. */
void avgpool_fwd_SUF(const SCALAR* x, SCALAR* y, int64_t P, int64_t H, int64_t W, int64_t k,
                     int nthreads) {
    int64_t Ho = H / k, Wo = W / k;
    const SCALAR div = (SCALAR)(k * k);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t p = 0; p < P; ++p) {
        const SCALAR* xp = x + p * H * W;
        SCALAR* yp = y + p * Ho * Wo;
        if (k == 2) {
            for (int64_t i = 0; i < Ho; ++i) {
                const SCALAR* r0 = xp + (2 * i) * W;
                const SCALAR* r1 = r0 + W;
                SCALAR* yr = yp + i * Wo;
                for (int64_t j = 0; j < Wo; ++j) {
                    SCALAR s = (SCALAR)0;
                    s += r0[2 * j]; s += r0[2 * j + 1]; s += r1[2 * j]; s += r1[2 * j + 1];
                    yr[j] = s / div;
                }
            }
        } else {
            for (int64_t i = 0; i < Ho; ++i)
                for (int64_t j = 0; j < Wo; ++j) {
                    SCALAR s = (SCALAR)0;
                    for (int64_t a = 0; a < k; ++a)
                        for (int64_t b = 0; b < k; ++b) s += xp[(i * k + a) * W + j * k + b];
                    yp[i * Wo + j] = s / div;
                }
        }
    }
}

/* Its backward: every input position gets grad/(k*k) of its window (0 outside windows). */
void avgpool_bwd_SUF(const SCALAR* g, SCALAR* dx, int64_t P, int64_t H, int64_t W, int64_t k,
                     int nthreads) {
    int64_t Ho = H / k, Wo = W / k;
    const SCALAR div = (SCALAR)(k * k);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t p = 0; p < P; ++p) {
        const SCALAR* gp = g + p * Ho * Wo;
        SCALAR* dp = dx + p * H * W;
        for (int64_t r = 0; r < H; ++r) {
            SCALAR* dr = dp + r * W;
            int64_t i = r / k;
            if (i >= Ho) { for (int64_t c = 0; c < W; ++c) dr[c] = (SCALAR)0; continue; }
            const SCALAR* gr = gp + i * Wo;
            if (k == 2) {
                for (int64_t j = 0; j < Wo; ++j) { SCALAR v = gr[j] / div; dr[2 * j] = v; dr[2 * j + 1] = v; }
            } else {
                for (int64_t j = 0; j < Wo; ++j) { SCALAR v = gr[j] / div; for (int64_t b = 0; b < k; ++b) dr[j * k + b] = v; }
            }
            for (int64_t c = Wo * k; c < W; ++c) dr[c] = (SCALAR)0;
        }
    }
}

/* Backward. G[t] at G + t*gts; U [T, N] saved pre-reset potentials; dI [T, N] out, or
   [N] = sum over t when sum_t (input broadcast over time: its gradient is that sum).
   dleak / dthr: nthreads x C doubles (zeroed by the caller) or NULL when not needed. */
void lif_bwd_SUF(const SCALAR* G, int64_t gts, const SCALAR* U, SCALAR* dI,
                 const SCALAR* leak, const SCALAR* thr, double* dleak, double* dthr,
                 int64_t Tn, int64_t N, int64_t C, int64_t S,
                 int hard, int kind, double scale, int sum_t, int nthreads) {
    int64_t ntiles = (N + TILE - 1) / TILE;
    const SCALAR s = (SCALAR)scale;
    int mode = (hard ? 3 : 0) + kind + (sum_t ? 6 : 0);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
        SCALAR lk[TILE], th[TILE], al[TILE], at[TILE]; int32_t ch[TILE];
        int64_t n0 = tile * TILE, L = N - n0 < TILE ? N - n0 : TILE;
        gather_SUF(leak, thr, n0, L, C, S, lk, th, ch);
#define BWD(H, K, ST) bwd_tile_SUF(G, gts, U, dI, lk, th, al, at, Tn, N, n0, L, s, H, K, ST)
        switch (mode) {
            case 0: BWD(0, 0, 0); break;   case 1: BWD(0, 1, 0); break;   case 2: BWD(0, 2, 0); break;
            case 3: BWD(1, 0, 0); break;   case 4: BWD(1, 1, 0); break;   case 5: BWD(1, 2, 0); break;
            case 6: BWD(0, 0, 1); break;   case 7: BWD(0, 1, 1); break;   case 8: BWD(0, 2, 1); break;
            case 9: BWD(1, 0, 1); break;   case 10: BWD(1, 1, 1); break;  default: BWD(1, 2, 1); break;
        }
#undef BWD
        int tid = snn_tid();
        if (dleak) { double* acc = dleak + (int64_t)tid * C;
            for (int64_t i = 0; i < L; ++i) acc[ch[i]] += (double)al[i]; }
        if (dthr) { double* acc = dthr + (int64_t)tid * C;
            for (int64_t i = 0; i < L; ++i) acc[ch[i]] += (double)at[i]; }
    }
}
