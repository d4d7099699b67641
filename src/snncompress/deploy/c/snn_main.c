/* snncompress C engine driver: ./snn [--spikes] < images.u8
 *
 * Reads raw uint8 images back to back (C x H x W, no header) from stdin and prints one
 * line per image: the predicted class, then the logits summed over the timesteps; with
 * --spikes, then " |" and each spiking layer's spike count. A build with -DSNN_COUNT_OPS
 * ends each line with " | adds muls" (operations executed for that image). */
#include <stdio.h>
#include <string.h>

#include "snn_model.h"

int main(int argc, char **argv)
{
    static uint8_t image[SNN_INPUT_SIZE];
    snn_logit_t logits[SNN_CLASSES];
    int show_spikes = 0, i;
    size_t got;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--spikes") == 0) {
            show_spikes = 1;
        } else {
            fprintf(stderr, "usage: %s [--spikes] < images.u8 (%d bytes per image)\n", argv[0], SNN_INPUT_SIZE);
            return 2;
        }
    }
    while ((got = fread(image, 1, SNN_INPUT_SIZE, stdin)) == SNN_INPUT_SIZE) {
        int predicted = snn_predict(image, logits);
        printf("%d", predicted);
        for (i = 0; i < SNN_CLASSES; i++) {
#if SNN_INTEGER
            printf(" %ld", (long)logits[i]);
#else
            printf(" %.9g", (double)logits[i]);
#endif
        }
        if (show_spikes) {
            const uint32_t *spikes = snn_last_spikes();
            printf(" |");
            for (i = 0; i < SNN_SPIKING_LAYERS; i++) printf(" %lu", (unsigned long)spikes[i]);
        }
#ifdef SNN_COUNT_OPS
        printf(" | %llu %llu", (unsigned long long)snn_ops_add, (unsigned long long)snn_ops_mul);
#endif
        printf("\n");
    }
    if (got != 0) {
        fprintf(stderr, "snn: a partial image at the end of the input (%lu of %d bytes)\n",
                (unsigned long)got, SNN_INPUT_SIZE);
        return 1;
    }
    return 0;
}
