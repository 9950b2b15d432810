// copy_out.h — the C ABI's way of handing a string back (camel_shim.h:
// camel_library_function_names, camel_library_function_constants), shared by the
// simulator's runtime (sim/runtime.cpp) and the CUDA shim's (cuda/runtime.cpp).
#ifndef CAMEL_SIM_COPY_OUT_H
#define CAMEL_SIM_COPY_OUT_H

#include <stdint.h>
#include <string.h>

#include <string>

// s into out (cap bytes, NUL-terminated, cut to fit; nothing when out is NULL or cap 0).
// Returns the length needed, excluding the NUL.
static inline uint64_t copy_out(const std::string &s, char *out, uint64_t cap) {
    if (out && cap) {
        uint64_t n = s.size() < cap - 1 ? s.size() : cap - 1;
        memcpy(out, s.data(), n);
        out[n] = 0;
    }
    return s.size();
}

#endif
