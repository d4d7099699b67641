
/* state arrays [B, N]; current/noise/spikes/traces [k, B, N]; threshold [N]; scratch [N] */
void dc_population_f32(int64_t k, int64_t B, int64_t N, const float* current, const float* noise,
                       float* v, float* countdown, float* inh_v, float* inh_countdown,
                       float* inh_last, float* exc_last, float* threshold, float* x_post,
                       float* spikes_out, float* traces_out, float* counts, float* inh_counts,
                       float* scratch, const double* p, int layer, int one_spike) {
    const float leak = (float)p[0], reset = (float)p[1], refr = (float)p[2], inh_w = (float)p[3];
    const float exc_w = (float)p[4], inh_leak = (float)p[5], inh_thr = (float)p[6];
    const float inh_reset = (float)p[7], inh_refr = (float)p[8], theta_plus = (float)p[9];
    const float trace_keep = (float)p[10];
    for (int64_t t = 0; t < k; ++t) {
        for (int64_t j = 0; j < N; ++j) scratch[j] = 0.0f;
        for (int64_t b = 0; b < B; ++b) {
            float* vb = v + b * N; float* cb = countdown + b * N;
            float* src = (layer ? inh_last : exc_last) + b * N;
            float total = 0.0f;
            for (int64_t j = 0; j < N; ++j) total += src[j];
            const float* cur = current + (t * B + b) * N;
            const float* nz = noise ? noise + (t * B + b) * N : 0;
            float* out = spikes_out + (t * B + b) * N;
            int64_t pick = -1; float best = -1.0f;
            for (int64_t j = 0; j < N; ++j) {
                float inhibition = inh_w * (total - src[j]);
                float x = cur[j] - inhibition;
                float vj = leak * vb[j] + (cb[j] <= 0.0f ? x : 0.0f);
                int crossed = vj >= threshold[j];
                vb[j] = crossed ? reset : vj;
                cb[j] = crossed ? refr : cb[j] - 1.0f;
                scratch[j] += crossed ? 1.0f : 0.0f;
                out[j] = crossed ? 1.0f : 0.0f;
                if (one_spike && crossed && nz[j] > best) { best = nz[j]; pick = j; }
            }
            if (one_spike) {
                for (int64_t j = 0; j < N; ++j) out[j] = 0.0f;
                if (pick >= 0) out[pick] = 1.0f;
            }
            if (layer) {
                float* iv = inh_v + b * N; float* ic = inh_countdown + b * N; float* il = inh_last + b * N;
                float* el = exc_last + b * N;
                for (int64_t j = 0; j < N; ++j) {
                    float vj = inh_leak * iv[j] + (ic[j] <= 0.0f ? exc_w * el[j] : 0.0f);
                    int crossed = vj >= inh_thr;
                    iv[j] = crossed ? inh_reset : vj;
                    ic[j] = crossed ? inh_refr : ic[j] - 1.0f;
                    il[j] = crossed ? 1.0f : 0.0f;
                    inh_counts[b * N + j] += il[j];
                }
            }
            float* el = exc_last + b * N;
            float* xb = x_post ? x_post + b * N : 0;
            float* tr = traces_out ? traces_out + (t * B + b) * N : 0;
            for (int64_t j = 0; j < N; ++j) {
                el[j] = out[j];
                counts[b * N + j] += out[j];
                if (xb) { xb[j] = out[j] > 0.0f ? 1.0f : xb[j] * trace_keep; tr[j] = xb[j]; }
            }
        }
        if (theta_plus != 0.0f)
            for (int64_t j = 0; j < N; ++j) threshold[j] = threshold[j] + theta_plus * scratch[j];
    }
}
