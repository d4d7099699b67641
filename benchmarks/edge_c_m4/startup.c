/* Minimal Cortex-M4 start-up for QEMU's mps2-an386 board: vector table, .data/.bss set-up,
 * FPU on, semihosting handles (newlib rdimon), then main(). For bench_edge_c's qemu check only. */
#include <stdint.h>
#include <stdlib.h>
extern uint32_t __stack_top, __data_start, __data_end, _etext, __bss_start__, __bss_end__;
extern int main(void);
extern void initialise_monitor_handles(void);
void reset_handler(void) {
    uint32_t *src = &_etext, *dst;
    *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;  /* CPACR: enable the FPU (CP10, CP11) */
    __asm volatile("dsb\n isb");
    for (dst = &__data_start; dst < &__data_end;) *dst++ = *src++;
    for (dst = &__bss_start__; dst < &__bss_end__;) *dst++ = 0;
    initialise_monitor_handles();
    exit(main());
}
static void fault(void) { for (;;) {} }
__attribute__((section(".vectors"), used)) const void *vectors[16] = {
    &__stack_top, (void *)reset_handler, (void *)fault, (void *)fault, (void *)fault, (void *)fault, (void *)fault,
};
void _init(void) {} void _fini(void) {}
