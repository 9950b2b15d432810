// camel_check_msl.h — the compat header of the simulator's typed address-space check
// (translate.cpp, typed_check). The kernel's code is compiled a second time, syntax
// only, as C++ for OpenCL (clang -x clcpp), whose address spaces clang type-checks:
// the translation (TARGET_CHECK) keeps MSL's device, constant, threadgroup and
// thread, which are __global, __constant, __local and __private here (constant is a
// keyword of OpenCL's; every local variable is __private, as it is thread in MSL),
// so clang rejects a pointer or reference
// that changes address space in any expression, template, overload, assignment or
// return. The library a kernel sees is the simulator's own <metal_stdlib>
// (camel_sim_msl.h and camel_sim_simd.h, unchanged): its unqualified pointers and
// references are __generic there, which takes any address space but __constant; the
// check reports no mismatch that involves __generic (translate.cpp says why). This
// file only makes that library parse as C++ for OpenCL: words that are keywords there
// and names in MSL are renamed, and the runtime's table of function pointers (which
// C++ for OpenCL cannot declare) is replaced by member templates. Nothing here is
// compiled into a kernel.
#pragma once

// Keywords of C++ for OpenCL that are plain names in MSL (kernels and the header).
#define half __camel_half
#define global __camel_kw_global
#define local __camel_kw_local
#define generic __camel_kw_generic
#define kernel __camel_kw_kernel
#define read_only __camel_kw_read_only
#define write_only __camel_kw_write_only
#define read_write __camel_kw_read_write
#define pipe __camel_kw_pipe
#define vec_step __camel_kw_vec_step
#define addrspace_cast __camel_kw_addrspace_cast
#define sampler_t __camel_kw_sampler_t
#define event_t __camel_kw_event_t
#define queue_t __camel_kw_queue_t
#define reserve_id_t __camel_kw_reserve_id_t
#define clk_event_t __camel_kw_clk_event_t
// OpenCL 2.0's atomic types are predeclared; MSL's are metal::atomic<T>.
#define atomic_int __camel_atomic_int
#define atomic_uint __camel_atomic_uint
#define atomic_long __camel_atomic_long
#define atomic_ulong __camel_atomic_ulong
#define atomic_float __camel_atomic_float
#define atomic_double __camel_atomic_double
#define atomic_flag __camel_atomic_flag
#define thread_local
#pragma OPENCL EXTENSION __cl_clang_variadic_functions : enable
#pragma OPENCL EXTENSION __cl_clang_function_pointers : enable

// The runtime's table of function pointers: the same calls, as member templates.
#define camel_sim_runtime __camel_check_runtime_table
#include "../../front/sim_abi.h"
#undef camel_sim_runtime
struct camel_sim_runtime {
    template <class... A> void threadgroup_barrier(A...) const;
    template <class... A> void simdgroup_barrier(A...) const;
    template <class... A> void simd_collective(A...) const;
    template <class... A> void *threadgroup_static(A...) const;
    template <class... A> void fail(A...) const;
    template <class... A> int vprintf(A...) const;
    template <class... A> void simdgroup_block(A...) const;
};

// MSL's address spaces (sim_abi.h, above, has a field named thread; the library has none).
#define device __global
#define threadgroup __local
#define thread __private

// camel_sim_msl.h: frexp/modf/sincos outputs in thread memory; camel_sim_simd.h: Apple's
// simdgroup_load/store declarations
#define __CAMEL_TYPED_CHECK 1
#include "metal_stdlib"
