/*
 * fiber.h — the smallest possible cooperative threads ("fibers").
 *
 * A simulated GPU thread that may wait at a barrier or a SIMD-group op runs on
 * its own small stack. Waiting means: save the callee-saved registers and the
 * stack pointer, load another fiber's, return into it. That is all
 * camel_fiber_switch does (fiber.cpp, ~12 instructions per direction), which is
 * why it costs a few nanoseconds where ucontext's swapcontext (which also saves
 * the signal mask with a system call) costs ~160 ns.
 */
#ifndef CAMEL_SIM_FIBER_H
#define CAMEL_SIM_FIBER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Save the current registers on the current stack, store the stack pointer in
 * *save_sp, then continue the fiber whose saved stack pointer is `to_sp`. */
void camel_fiber_switch(void **save_sp, void *to_sp);

/* Prepare a fresh stack [stack, stack + size) so that the first switch to the
 * returned stack pointer calls entry(arg). entry must never return: it ends by
 * switching away for good. */
void *camel_fiber_init(void *stack, size_t size, void (*entry)(void *), void *arg);

#ifdef __cplusplus
}
#endif
#endif
