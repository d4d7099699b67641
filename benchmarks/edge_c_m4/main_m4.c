/* Cortex-M4 test program: classify the images compiled into images.h and print one
 * predicted class per line over semihosting (compare with the host build's first column). */
#include <stdio.h>

#include "snn_model.h"
#include "images.h"

int main(void)
{
    snn_logit_t logits[SNN_CLASSES];
    int i;
    for (i = 0; i < TEST_IMAGES; i++) printf("%d\n", snn_predict(test_images[i], logits));
    return 0;
}
