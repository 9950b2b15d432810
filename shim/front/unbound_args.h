// unbound_args.h — the words both runtimes (shim/sim, shim/cuda) put after "takes N buffer
// arguments, got M": the first buffer parameter left unbound, and the optional arguments
// (MSL 5.8.1.2) this specialisation does not declare. One text, so that a test of the
// message holds on every shim.
#pragma once

#include <stdint.h>

#include <string>

namespace camel_front {

struct UnboundArgs {
    std::string which;   // ": [[buffer(i)]] 'name' is not bound", or empty
    std::string absent;  // "; this pipeline leaves out the optional argument ...", or empty
};

// [first, last): the kernel's parameters, each with .name and .index (-1: none); is_buffer
// and is_absent classify one. nargs: the arguments the dispatch passed.
template <class It, class IsBuffer, class IsAbsent>
UnboundArgs unbound_args(It first, It last, uint32_t nargs, IsBuffer is_buffer,
                         IsAbsent is_absent) {
    std::string which, absent;
    for (It p = first; p != last; ++p) {
        if (is_buffer(*p) && p->index >= (int)nargs && which.empty())
            which = ": [[buffer(" + std::to_string(p->index) + ")]] '" + std::string(p->name) +
                    "' is not bound";
        if (is_absent(*p))
            absent += std::string(absent.empty() ? "" : ", ") + "'" + std::string(p->name) + "'" +
                      (p->index >= 0 ? " ([[buffer(" + std::to_string(p->index) + ")]])"
                                     : std::string());
    }
    if (!absent.empty())
        absent = "; this pipeline leaves out the optional argument" +
                 std::string(absent.find(',') != std::string::npos ? "s " : " ") + absent +
                 " (function constant false, 0 or without a value: MSL 5.8.1.2)";
    return {which, absent};
}

}  // namespace camel_front
