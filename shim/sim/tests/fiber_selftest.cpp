// fiber_selftest.cpp — checks the hand-written context switch in ../fiber.cpp.
//
// The simulator's fibers are ~25 lines of assembly per architecture; a wrong
// offset there corrupts a register that some compiled kernel happens to keep
// live across a barrier, which shows up (if at all) as a wrong number far away.
// So this program checks the contract directly:
//   1. many switches main -> fiber -> fiber -> main, in the runtime's pattern
//      (fibers switch straight to the next fiber, the last one back to main);
//   2. every callee-saved register survives a switch (set to known values in
//      assembly right before the call, compared right after);
//   3. live doubles and integers the compiler keeps in registers survive too;
//   4. a fiber starts with a 16-byte aligned stack and receives its argument;
//   5. a fiber that is done switches away for good, and its stack can be
//      prepared again (the runtime reuses stacks for every threadgroup).
//
// Build and run natively: make -C shim fiber-selftest. On an x86-64 Debian box
// the aarch64 path runs under user-mode emulation:
//   apt-get install qemu-user-static libc6-dev-arm64-cross \
//       libstdc++-12-dev-arm64-cross libgcc-12-dev-arm64-cross
//   cd shim && clang++-19 --target=aarch64-linux-gnu -std=c++17 -O2 -static \
//       -fuse-ld=lld -o /tmp/fiber_selftest_a64 sim/tests/fiber_selftest.cpp sim/fiber.cpp
//   qemu-aarch64-static /tmp/fiber_selftest_a64
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fiber.h"

static int failures = 0;

#define CHECK(cond, ...)                                          \
    do {                                                          \
        if (!(cond)) {                                            \
            fprintf(stderr, "[fiber-selftest] FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                         \
            fprintf(stderr, "\n");                                \
            if (++failures > 20) exit(1);                         \
        }                                                         \
    } while (0)

// ---- 2. callee-saved registers, set and checked in assembly -------------------
//
// uint64_t regs_switch(void **save_sp, void *to_sp, uint64_t seed):
// fills every callee-saved register with seed + k (k = 1, 2, ...), calls
// camel_fiber_switch(save_sp, to_sp), and returns a bit mask of the registers
// that no longer hold seed + k (bit k - 1), or bit 63 if sp moved. It saves and
// restores the caller's callee-saved registers itself, so it is an ordinary C
// function to its callers.
extern "C" uint64_t regs_switch(void **save_sp, void *to_sp, uint64_t seed);

#define STR2(x) #x
#define STR(x) STR2(x)

#if defined(__x86_64__)
// rbx, rbp, r12-r15 (k = 1..6) and rsp.
#define X86_CHK(reg, k) \
    "    leaq " STR(k) "(%rcx), %rdx\n    cmpq %rdx, %" #reg "\n    setne %dl\n" \
    "    movzbq %dl, %rdx\n    shlq $" STR(k) " - 1, %rdx\n    orq %rdx, %rax\n"
__asm__(".text\n.globl regs_switch\n.p2align 4\nregs_switch:\n"
        "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n"
        "    pushq %r14\n    pushq %r15\n"
        "    subq $24, %rsp\n"  // rsp is 16-byte aligned again, as the call needs
        "    movq %rdx, 8(%rsp)\n"  // the seed
        "    movq %rsp, 0(%rsp)\n"  // rsp as it is now
        "    leaq 1(%rdx), %rbx\n    leaq 2(%rdx), %rbp\n    leaq 3(%rdx), %r12\n"
        "    leaq 4(%rdx), %r13\n    leaq 5(%rdx), %r14\n    leaq 6(%rdx), %r15\n"
        "    callq camel_fiber_switch\n"
        "    movq 8(%rsp), %rcx\n"
        "    xorl %eax, %eax\n"
        X86_CHK(rbx, 1) X86_CHK(rbp, 2) X86_CHK(r12, 3) X86_CHK(r13, 4)
        X86_CHK(r14, 5) X86_CHK(r15, 6)
        "    cmpq %rsp, 0(%rsp)\n    setne %dl\n    movzbq %dl, %rdx\n"
        "    shlq $63, %rdx\n    orq %rdx, %rax\n"
        "    addq $24, %rsp\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n"
        "    popq %rbx\n    popq %rbp\n"
        "    ret\n");
#elif defined(__aarch64__)
// x19-x28 (k = 1..10), fp (k = 11), d8-d15 (k = 12..19) and sp. lr is checked by
// the switch returning here at all.
#define A64_X(reg, k) "    add " #reg ", x2, #" STR(k) "\n"
#define A64_D(reg, k) "    add x9, x2, #" STR(k) "\n    fmov " #reg ", x9\n"
#define A64_CHKX(reg, k) \
    "    add x9, x10, #" STR(k) "\n    cmp " #reg ", x9\n    cset x11, ne\n" \
    "    orr x0, x0, x11, lsl #" STR(k) " - 1\n"
#define A64_CHKD(reg, k) "    fmov x12, " #reg "\n" A64_CHKX(x12, k)
__asm__(".text\n.globl regs_switch\n.p2align 4\nregs_switch:\n"
        "    stp x29, x30, [sp, #-192]!\n"
        "    stp x19, x20, [sp, #16]\n    stp x21, x22, [sp, #32]\n"
        "    stp x23, x24, [sp, #48]\n    stp x25, x26, [sp, #64]\n"
        "    stp x27, x28, [sp, #80]\n"
        "    stp d8, d9, [sp, #96]\n    stp d10, d11, [sp, #112]\n"
        "    stp d12, d13, [sp, #128]\n    stp d14, d15, [sp, #144]\n"
        "    mov x9, sp\n    stp x2, x9, [sp, #160]\n"  // the seed and sp as it is now
        A64_X(x19, 1) A64_X(x20, 2) A64_X(x21, 3) A64_X(x22, 4) A64_X(x23, 5)
        A64_X(x24, 6) A64_X(x25, 7) A64_X(x26, 8) A64_X(x27, 9) A64_X(x28, 10)
        A64_X(x29, 11)
        A64_D(d8, 12) A64_D(d9, 13) A64_D(d10, 14) A64_D(d11, 15) A64_D(d12, 16)
        A64_D(d13, 17) A64_D(d14, 18) A64_D(d15, 19)
        "    bl camel_fiber_switch\n"
        "    ldp x10, x13, [sp, #160]\n"
        "    mov x0, #0\n"
        A64_CHKX(x19, 1) A64_CHKX(x20, 2) A64_CHKX(x21, 3) A64_CHKX(x22, 4)
        A64_CHKX(x23, 5) A64_CHKX(x24, 6) A64_CHKX(x25, 7) A64_CHKX(x26, 8)
        A64_CHKX(x27, 9) A64_CHKX(x28, 10) A64_CHKX(x29, 11)
        A64_CHKD(d8, 12) A64_CHKD(d9, 13) A64_CHKD(d10, 14) A64_CHKD(d11, 15)
        A64_CHKD(d12, 16) A64_CHKD(d13, 17) A64_CHKD(d14, 18) A64_CHKD(d15, 19)
        "    mov x9, sp\n    cmp x9, x13\n    cset x11, ne\n    orr x0, x0, x11, lsl #63\n"
        "    ldp x19, x20, [sp, #16]\n    ldp x21, x22, [sp, #32]\n"
        "    ldp x23, x24, [sp, #48]\n    ldp x25, x26, [sp, #64]\n"
        "    ldp x27, x28, [sp, #80]\n"
        "    ldp d8, d9, [sp, #96]\n    ldp d10, d11, [sp, #112]\n"
        "    ldp d12, d13, [sp, #128]\n    ldp d14, d15, [sp, #144]\n"
        "    ldp x29, x30, [sp], #192\n"
        "    ret\n");
#else
#error "fiber_selftest: only x86-64 and aarch64"
#endif

// ---- the fibers -----------------------------------------------------------------

constexpr int kFibers = 5;
constexpr int kRounds = 20000;
constexpr size_t kStack = 64 * 1024;

struct Fiber {
    void *sp;
    int id;
    int rounds_done;
    bool done;
    int entries;  // how often entry() started on this fiber (must be 1 per init)
};

static Fiber fibers[kFibers];
static void *main_sp;
static int step;  // which test the fibers run

// Where fiber i switches to: the next fiber, the last one back to main, as the
// runtime's block() goes straight from one ready lane to the next.
static void *next_sp(int i) { return i + 1 < kFibers ? fibers[i + 1].sp : main_sp; }

// Many doubles and integers live across a switch: with -O2 the compiler keeps
// most of them in callee-saved registers (d8-d15, x19-x28 / rbx, r12-r15).
__attribute__((noinline)) static bool live_values_survive(Fiber *f, int round) {
    volatile double vd = 1.0 + f->id + round * 1e-3;
    volatile uint64_t vi = 1000 * (uint64_t)f->id + (uint64_t)round;
    double d0 = vd, d1 = d0 * 1.5, d2 = d1 + 0.25, d3 = d2 * d0, d4 = d3 - 7.0, d5 = d4 * 0.5,
           d6 = d5 + d1, d7 = d6 * 3.0, d8 = d7 - d2, d9 = d8 + d0;
    uint64_t i0 = vi, i1 = i0 * 3 + 1, i2 = i1 ^ 0x55, i3 = i2 + i0, i4 = i3 * 7, i5 = i4 - i1,
             i6 = i5 ^ i2, i7 = i6 + 11, i8 = i7 * 5, i9 = i8 ^ i3;
    Fiber *self = f;
    camel_fiber_switch(&self->sp, next_sp(self->id));
    double dsum = d0 + 2 * d1 + 3 * d2 + 4 * d3 + 5 * d4 + 6 * d5 + 7 * d6 + 8 * d7 + 9 * d8 +
                  10 * d9;
    uint64_t isum = i0 + 2 * i1 + 3 * i2 + 4 * i3 + 5 * i4 + 6 * i5 + 7 * i6 + 8 * i7 + 9 * i8 +
                    10 * i9;
    // The same arithmetic again from the volatile inputs, which live in memory.
    double e0 = vd, e1 = e0 * 1.5, e2 = e1 + 0.25, e3 = e2 * e0, e4 = e3 - 7.0, e5 = e4 * 0.5,
           e6 = e5 + e1, e7 = e6 * 3.0, e8 = e7 - e2, e9 = e8 + e0;
    uint64_t j0 = vi, j1 = j0 * 3 + 1, j2 = j1 ^ 0x55, j3 = j2 + j0, j4 = j3 * 7, j5 = j4 - j1,
             j6 = j5 ^ j2, j7 = j6 + 11, j8 = j7 * 5, j9 = j8 ^ j3;
    double esum = e0 + 2 * e1 + 3 * e2 + 4 * e3 + 5 * e4 + 6 * e5 + 7 * e6 + 8 * e7 + 9 * e8 +
                  10 * e9;
    uint64_t jsum = j0 + 2 * j1 + 3 * j2 + 4 * j3 + 5 * j4 + 6 * j5 + 7 * j6 + 8 * j7 + 9 * j8 +
                    10 * j9;
    return self == f && dsum == esum && isum == jsum;
}

// Compiled code with a 16-byte aligned SIMD local, as kernels have (float4).
typedef float float4 __attribute__((vector_size(16)));

// Returns the local's address modulo 16 (0 when aligned).
__attribute__((noinline)) static uintptr_t aligned_local_misalignment(float x) {
    volatile float4 v = {x, x + 1, x + 2, x + 3};
    v = v * v;
    uintptr_t address = (uintptr_t)&v;
    return address % 16;
}

static void fiber_entry(void *arg) {
    Fiber *f = (Fiber *)arg;
    f->entries++;
    CHECK(f >= fibers && f < fibers + kFibers, "entry got arg %p, not a fiber", arg);
    uintptr_t frame = (uintptr_t)__builtin_frame_address(0);
    CHECK(frame % 16 == 0, "fiber %d: frame address %#lx is not 16-byte aligned", f->id,
          (unsigned long)frame);
    uintptr_t off = aligned_local_misalignment((float)f->id);
    CHECK(off == 0, "fiber %d: a float4 local is %lu bytes off 16-byte alignment", f->id,
          (unsigned long)off);
    for (int r = 0; r < kRounds; r++) {
        f->rounds_done++;  // counted before the switch that ends this round
        if (step == 0) {
            camel_fiber_switch(&f->sp, next_sp(f->id));
        } else if (step == 1) {
            uint64_t seed = ((uint64_t)(f->id + 1) << 40) | ((uint64_t)r << 8);
            uint64_t bad = regs_switch(&f->sp, next_sp(f->id), seed);
            CHECK(bad == 0, "fiber %d round %d: callee-saved registers changed, mask %#llx",
                  f->id, r, (unsigned long long)bad);
        } else {
            CHECK(live_values_survive(f, r), "fiber %d round %d: live values changed", f->id, r);
        }
    }
    // Done: switch away for good, as the runtime's lane_main does.
    f->done = true;
    camel_fiber_switch(&f->sp, next_sp(f->id));
    CHECK(false, "fiber %d resumed after it was done", f->id);
    abort();
}

// Runs every fiber through one test: main starts fiber 0 each round, the
// fibers pass control down the line, the last one returns to main.
static void run_step(unsigned char *stacks, int s, size_t shift) {
    step = s;
    for (int i = 0; i < kFibers; i++) {
        fibers[i] = Fiber{nullptr, i, 0, false, 0};
        // Odd base and size shifts check that camel_fiber_init aligns the top
        // itself (the runtime shifts each stack by a multiple of 64 bytes).
        unsigned char *base = stacks + i * kStack + shift;
        fibers[i].sp = camel_fiber_init(base, kStack - 2 * shift - 64 * i, fiber_entry, &fibers[i]);
    }
    for (int r = 0; r <= kRounds; r++) {
        uint64_t seed = 0xabcd000000000000ull | ((uint64_t)r << 8);
        uint64_t bad = regs_switch(&main_sp, fibers[0].sp, seed);
        CHECK(bad == 0, "main, step %d round %d: callee-saved registers changed, mask %#llx", s,
              r, (unsigned long long)bad);
        for (int i = 0; i < kFibers; i++)
            CHECK(fibers[i].rounds_done == (r < kRounds ? r + 1 : kRounds),
                  "step %d round %d: fiber %d did %d rounds", s, r, i, fibers[i].rounds_done);
    }
    for (int i = 0; i < kFibers; i++) {
        CHECK(fibers[i].done, "step %d: fiber %d did not finish", s, i);
        CHECK(fibers[i].entries == 1, "step %d: fiber %d entered %d times", s, i,
              fibers[i].entries);
    }
}

static const size_t kShifts[] = {0, 8, 13};

int main() {
    // One allocation reused for every step, as the runtime reuses its stacks.
    unsigned char *stacks = (unsigned char *)aligned_alloc(64, kFibers * kStack);
    if (!stacks) return 1;
    const char *names[] = {"switch ring", "callee-saved registers (asm)",
                           "live values across a switch"};
    for (int s = 0; s < 3; s++)
        for (size_t shift : kShifts) {
            memset(stacks, 0xa5, kFibers * kStack);  // stale bytes from "earlier groups"
            run_step(stacks, s, shift);
            if (shift == 0)
                printf("[fiber-selftest] %-30s %d fibers x %d rounds: %s\n", names[s], kFibers,
                       kRounds, failures ? "FAILED" : "ok");
        }
    free(stacks);
    if (failures) {
        printf("[fiber-selftest] %d failure(s)\n", failures);
        return 1;
    }
    printf("[fiber-selftest] all ok\n");
    return 0;
}
