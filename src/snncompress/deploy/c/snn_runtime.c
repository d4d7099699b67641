/* snncompress C engine runtime (see snn_runtime.h). The numpy reference
 * (snncompress.deploy.c.reference) mirrors every operation here, in the same order. */
#if defined(__GNUC__) && !defined(__clang__) && !defined(SNN_NO_VECTORIZE)
/* let GCC vectorise the accumulation runs at the documented -O2 (no effect on results:
 * each run adds to distinct neurons, and no float operation is reordered) */
#pragma GCC optimize("tree-vectorize", "vect-cost-model=dynamic")
#endif
#include "snn_model.h"

#ifdef SNN_TRACE
#include <stdio.h>
#endif

#ifdef SNN_COUNT_OPS
uint64_t snn_ops_add, snn_ops_mul;
#define COUNT(adds, muls) (snn_ops_add += (uint64_t)(adds), snn_ops_mul += (uint64_t)(muls))
#else
#define COUNT(adds, muls) ((void)0)
#endif

#define SNN_LEAK_BITS 16
#define SNN_INPUT_BITS 16

static uint32_t spike_counts[SNN_SPIKING_LAYERS];
static int32_t event_count[SNN_LAYERS];
static snn_value_t logit_sum[SNN_CLASSES];

const uint32_t *snn_last_spikes(void) { return spike_counts; }

#if SNN_PACKED_BITS
static snn_weight_t weight_scratch[SNN_MAX_RUN];

/* Codes start .. start + n - 1 of L's weight stream, unpacked (sign-extended) into the scratch buffer. */
static const snn_weight_t *weight_run(const snn_layer_t *L, int32_t start, int32_t n)
{
    const uint32_t mask = (1u << SNN_PACKED_BITS) - 1, sign = 1u << (SNN_PACKED_BITS - 1);
    uint32_t bit = (uint32_t)start * SNN_PACKED_BITS;
    int32_t e;
    for (e = 0; e < n; e++, bit += SNN_PACKED_BITS) {
        const uint8_t *byte = L->weights + (bit >> 3);
        uint32_t code = (((uint32_t)byte[0] | ((uint32_t)byte[1] << 8)) >> (bit & 7)) & mask;
        weight_scratch[e] = (snn_weight_t)((int32_t)(code ^ sign) - (int32_t)sign);
    }
    return weight_scratch;
}
#else
/* Codes start .. start + n - 1 of L's weights (stored one per element: no copy). */
static const snn_weight_t *weight_run(const snn_layer_t *L, int32_t start, int32_t n)
{
    (void)n;
    return L->weights + start;
}
#endif

/* Which of the taps before / after position p (of n) fall inside: bit 0 before, bit 1 after. */
static int border_class(int32_t p, int32_t n) { return (p > 0) | ((p < n - 1) << 1); }

#if SNN_INTEGER
static int64_t input_total[SNN_FIRST_CHANNELS];
static int32_t input_part[SNN_FIRST_CHANNELS];
#endif

/* The first layer's current, once per image, channels-last into cur. Weights are stored
 * [in_c][3][3][out_c]: each in-bounds tap adds weight * pixel to the out_c currents of one
 * position, in the order ci, ky, kx (the reference's order). */
static void input_current(const snn_layer_t *L, const uint8_t *image, snn_value_t *restrict cur)
{
    int32_t y, x, co, ci, ky, kx, n = L->out_c;
    for (y = 0; y < L->out_h; y++) {
        for (x = 0; x < L->out_w; x++) {
            int cls = border_class(y, L->out_h) * 4 + border_class(x, L->out_w);
            snn_value_t *restrict out = cur + (y * L->out_w + x) * n;
#if SNN_INTEGER
            int64_t *restrict total = input_total;
            int32_t *restrict part = input_part;
            for (co = 0; co < n; co++) total[co] = 0;
#else
            for (co = 0; co < n; co++) out[co] = L->border_bias[co * 16 + cls];
#endif
            for (ci = 0; ci < L->in_c; ci++) {
                const uint8_t *plane = image + ci * L->in_h * L->in_w;
#if SNN_INTEGER
                for (co = 0; co < n; co++) part[co] = 0;
#endif
                for (ky = 0; ky < 3; ky++) {
                    int32_t iy = y + ky - 1;
                    if (iy < 0 || iy >= L->in_h) continue;
                    for (kx = 0; kx < 3; kx++) {
                        int32_t ix = x + kx - 1;
                        const snn_weight_t *restrict w;
                        if (ix < 0 || ix >= L->in_w) continue;
                        w = weight_run(L, ((ci * 3 + ky) * 3 + kx) * n, n);
#if SNN_INTEGER
                        int32_t p = plane[iy * L->in_w + ix];
#if SNN_WEIGHT_BYTES == 1
                        /* |code| <= 127, pixel <= 255: the product fits int16 (a vector multiply on SSE2/NEON) */
                        for (co = 0; co < n; co++) part[co] += (int16_t)((int16_t)w[co] * (int16_t)p);
#else
                        for (co = 0; co < n; co++) part[co] += (int32_t)w[co] * p;
#endif
#else
                        float p = (float)plane[iy * L->in_w + ix];
                        for (co = 0; co < n; co++) out[co] += w[co] * p;
#endif
                        COUNT(n, n);
                    }
                }
#if SNN_INTEGER
                for (co = 0; co < n; co++) total[co] += L->input_scale[ci] * part[co];
                COUNT(n, n);
#endif
            }
#if SNN_INTEGER
            for (co = 0; co < n; co++)
                out[co] = (int32_t)((total[co] + ((int64_t)1 << (SNN_INPUT_BITS - 1))) >> SNN_INPUT_BITS)
                          + L->border_bias[co * 16 + cls];
            COUNT(2 * n, 0);
#endif
        }
    }
}

/* u = leak * u_hat (+ bias) (+ extra: the first layer's current), per neuron. */
static void leak_pass(const snn_layer_t *L, const snn_value_t *extra)
{
    int32_t pos, c, n = L->out_c, positions = L->out_h * L->out_w;
    snn_value_t *restrict m = L->mem;
    const snn_value_t *restrict leak = L->leak, *restrict bias = L->bias;
    for (pos = 0; pos < positions; pos++, m += n) {
        const snn_value_t *restrict e = extra ? extra + pos * n : 0;
#if SNN_INTEGER
        if (!L->leak_one) {
            for (c = 0; c < n; c++)
                m[c] = (int32_t)(((int64_t)leak[c] * m[c] + (1 << (SNN_LEAK_BITS - 1))) >> SNN_LEAK_BITS);
            COUNT(n, n);
        }
        if (bias) { for (c = 0; c < n; c++) m[c] += bias[c]; COUNT(n, 0); }
        if (e) { for (c = 0; c < n; c++) m[c] += e[c]; COUNT(n, 0); }
#else
        if (e && L->leak_one) {
            for (c = 0; c < n; c++) m[c] = m[c] + e[c];
            COUNT(n, 0);
        } else if (e) {
            for (c = 0; c < n; c++) m[c] = leak[c] * m[c] + e[c];
            COUNT(n, n);
        } else if (bias) {
            for (c = 0; c < n; c++) m[c] = leak[c] * m[c] + bias[c];
            COUNT(n, n);
        } else if (!L->leak_one) {
            for (c = 0; c < n; c++) m[c] = leak[c] * m[c];
            COUNT(0, n);
        }
#endif
    }
}

#if SNN_INTEGER
/* weight << shift, as an int32 (two's complement; the export's bound keeps it in range) */
#define SHIFTED(w, shift) ((int32_t)((uint32_t)(int32_t)(w) << (shift)))

/* m[e] += (w[e] * k) << F for e < n (target: m[target[e]]), as one shifted addition per set
 * bit of k (k = 1, 2, 4: one addition, no multiply). */
static void add_weights(const snn_weight_t *restrict w, const snn_target_t *restrict target, int32_t n,
                        int32_t k, int32_t shift, snn_value_t *restrict m)
{
    int32_t e;
    for (; k; k >>= 1, shift++) {
        if (!(k & 1)) continue;
        if (target) {
            for (e = 0; e < n; e++) m[target[e]] += SHIFTED(w[e], shift);
        } else {
            for (e = 0; e < n; e++) m[e] += SHIFTED(w[e], shift);
        }
        COUNT(n, 0);
    }
}
#else
/* m[e] += w[e] * k for e < n (target: m[target[e]]); k = 1 adds w itself. */
static void add_weights(const snn_weight_t *restrict w, const snn_target_t *restrict target, int32_t n,
                        int32_t k, int32_t shift, snn_value_t *restrict m)
{
    int32_t e;
    float count = (float)k;
    (void)shift; /* the float engine has no fraction bits */
    if (target) {
        if (k == 1) { for (e = 0; e < n; e++) m[target[e]] += w[e]; }
        else { for (e = 0; e < n; e++) m[target[e]] += w[e] * count; }
    } else {
        if (k == 1) { for (e = 0; e < n; e++) m[e] += w[e]; }
        else { for (e = 0; e < n; e++) m[e] += w[e] * count; }
    }
    COUNT(n, k == 1 ? 0 : n);
}
#endif

/* Add the run of weights of input group `group` (dense: out_c weights; sparse: the kept ones) times k at m. */
static void add_run(const snn_layer_t *L, int32_t group, int32_t k, snn_value_t *m)
{
    if (!L->ptr) {
        add_weights(weight_run(L, group * L->out_c, L->out_c), 0, L->out_c, k, L->frac_bits, m);
    } else {
        int32_t lo = L->ptr[group];
        add_weights(weight_run(L, lo, L->ptr[group + 1] - lo), L->targets + lo, L->ptr[group + 1] - lo, k,
                    L->frac_bits, m);
    }
}

/* A spike (count k) at input (ci, y, x) of a convolution: for each kernel row, the three taps
 * reach three neighbouring output positions. A dense layer stores each row's taps in the order
 * kx = 2, 1, 0 (output x-1, x, x+1): inside the map the row is one run of 3 x out_c weights
 * onto 3 x out_c contiguous membranes (channels-last). Each target gets one addition per
 * event, so the order inside an event does not change any sum. */
static void add_conv_event(const snn_layer_t *L, int32_t ci, int32_t y, int32_t x, int32_t k)
{
    int32_t ky, kx, n = L->out_c;
    for (ky = 0; ky < 3; ky++) {
        int32_t oy = y + 1 - ky;
        snn_value_t *row;
        if (oy < 0 || oy >= L->out_h) continue;
        row = L->mem + oy * L->out_w * n;
        if (!L->ptr && x >= 1 && x + 1 < L->out_w) {
            add_weights(weight_run(L, (ci * 3 + ky) * 3 * n, 3 * n), 0, 3 * n, k, L->frac_bits, row + (x - 1) * n);
            continue;
        }
        for (kx = 0; kx < 3; kx++) {
            int32_t ox = x + 1 - kx;
            if (ox < 0 || ox >= L->out_w) continue;
            add_run(L, L->ptr ? ci * 9 + ky * 3 + kx : (ci * 3 + ky) * 3 + 2 - kx, k, row + ox * n);
        }
    }
}

/* Accumulate the events of layer P into layer L's membrane (or accumulator); clear P's counts. */
static void add_events(const snn_layer_t *L, const snn_layer_t *P, int32_t events)
{
    int32_t e;
    for (e = 0; e < events; e++) {
        int32_t index = (int32_t)P->events[e];
        int32_t k = P->pool > 1 ? P->counts[index] : 1;
        if (L->kind == SNN_LINEAR) {
            add_run(L, index, k, L->mem);
        } else {
            int32_t ci = index % L->in_c, pos = index / L->in_c;
            add_conv_event(L, ci, pos / L->in_w, pos % L->in_w, k);
        }
    }
    if (P->pool > 1)
        for (e = 0; e < events; e++) P->counts[P->events[e]] = 0;
}

/* Membrane quantizer: u -> code * step (round half away from zero, saturating). */
static snn_value_t quantize_state(const snn_layer_t *L, int32_t c, snn_value_t u)
{
#if SNN_INTEGER
    int32_t code = (int32_t)(((int64_t)u * L->state_mul[c] + ((int64_t)1 << (L->state_shift - 1))) >> L->state_shift);
    if (code > L->state_qmax) code = L->state_qmax;
    if (code < -L->state_qmax) code = -L->state_qmax;
    COUNT(2, 2);
    return code * L->state_back[c];
#else
    float r = u / L->state_mul[c], limit = (float)(L->state_qmax + 1);
    int32_t code;
    if (r > limit) r = limit;
    if (r < -limit) r = -limit;
    code = (int32_t)(r >= 0.0f ? r + 0.5f : r - 0.5f);
    if (code > L->state_qmax) code = L->state_qmax;
    if (code < -L->state_qmax) code = -L->state_qmax;
    COUNT(1, 2);
    return (float)code * L->state_mul[c];
#endif
}

/* Spike, reset, quantize; emit the (pooled) events; returns how many events. */
static int32_t fire(const snn_layer_t *L, uint32_t *spikes)
{
    int32_t y, x, c, n = 0;
    snn_value_t *m = L->mem;
    for (y = 0; y < L->out_h; y++) {
        for (x = 0; x < L->out_w; x++, m += L->out_c) {
            int32_t py = y / L->pool, px = x / L->pool;
            int pooled = L->pool > 1 && py < L->pool_h && px < L->pool_w;
            for (c = 0; c < L->out_c; c++) {
                snn_value_t u = m[c];
                int spike = u >= L->fire_at[c];
                if (spike) {
                    u = L->hard_reset ? (snn_value_t)0 : u - L->threshold[c];
                    COUNT(!L->hard_reset, 0);
                    (*spikes)++;
#ifdef SNN_TRACE
                    printf(" %ld", (long)((y * L->out_w + x) * L->out_c + c));
#endif
                    if (L->pool == 1) {
                        L->events[n++] = (snn_index_t)((y * L->out_w + x) * L->out_c + c);
                    } else if (pooled) {
                        int32_t cell = (py * L->pool_w + px) * L->out_c + c;
                        if (L->counts[cell]++ == 0) L->events[n++] = (snn_index_t)cell;
                    }
                }
                if (L->state_mul) m[c] = quantize_state(L, c, u);
                else if (spike) m[c] = u;
            }
        }
    }
    return n;
}

#ifdef SNN_TRACE
static void trace(int t, int l, const snn_layer_t *L)
{
    int32_t i, size = L->out_h * L->out_w * L->out_c;
    printf("\nM %d %d", t, l);
    for (i = 0; i < size; i++) {
#if SNN_INTEGER
        printf(" %ld", (long)L->mem[i]);
#else
        union { float f; uint32_t u; } bits;
        bits.f = L->mem[i];
        printf(" %08lx", (unsigned long)bits.u);
#endif
    }
    printf("\n");
}
#endif

int snn_predict(const uint8_t *image, snn_logit_t *logits)
{
    int32_t t, l, i, best = 0, spiking;
#ifdef SNN_COUNT_OPS
    snn_ops_add = snn_ops_mul = 0;
#endif
    for (l = 0; l < SNN_LAYERS; l++) {
        const snn_layer_t *L = &snn_layers[l];
        int32_t size = L->out_h * L->out_w * L->out_c;
        for (i = 0; i < size; i++) L->mem[i] = 0;
        event_count[l] = 0;
    }
    for (l = 0; l < SNN_SPIKING_LAYERS; l++) spike_counts[l] = 0;
    for (i = 0; i < SNN_CLASSES; i++) logit_sum[i] = 0;
#if SNN_T > 1
    input_current(&snn_layers[0], image, snn_input_current);
#else
    input_current(&snn_layers[0], image, snn_layers[0].mem); /* u = leak*0 + I = I */
#endif
    for (t = 0; t < SNN_T; t++) {
        spiking = 0;
        for (l = 0; l < SNN_LAYERS; l++) {
            const snn_layer_t *L = &snn_layers[l];
            if (L->kind == SNN_INPUT_CONV) {
#if SNN_T > 1
                leak_pass(L, snn_input_current);
#endif
            } else if (L->spiking) {
                leak_pass(L, 0);
                add_events(L, &snn_layers[l - 1], event_count[l - 1]);
            } else {
                for (i = 0; i < L->out_c; i++) L->mem[i] = 0;
                add_events(L, &snn_layers[l - 1], event_count[l - 1]);
                for (i = 0; i < L->out_c; i++) logit_sum[i] += L->mem[i];
                COUNT(L->out_c, 0);
                continue;
            }
#ifdef SNN_TRACE
            printf("S %d %d", (int)t, (int)l);
#endif
            event_count[l] = fire(L, &spike_counts[spiking++]);
            if (l == SNN_LAYERS - 1) { /* a spiking output layer: the logits count its spikes */
                for (i = 0; i < event_count[l]; i++) logit_sum[L->events[i]] += 1;
                COUNT(event_count[l], 0);
            }
#ifdef SNN_TRACE
            trace(t, l, L);
#endif
        }
    }
    for (i = 0; i < SNN_CLASSES; i++) {
#if SNN_INTEGER
        logits[i] = (int32_t)((int64_t)logit_sum[i] * snn_logit_mul[i]);
#else
        logits[i] = logit_sum[i];
#endif
        if (logits[i] > logits[best]) best = i;
    }
    return best;
}
