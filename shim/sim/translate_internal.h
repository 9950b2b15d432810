// translate_internal.h — the two halves of the simulator's MSL compiler:
//   translate.cpp          the driver: find clang, preprocess, cache, compile
//   translate_rewrite.cpp  the MSL -> C++ token rewrite, the portability
//                          guard and the generated entry wrappers
#ifndef CAMEL_SIM_TRANSLATE_INTERNAL_H
#define CAMEL_SIM_TRANSLATE_INTERNAL_H

#include <string>

namespace camel_sim {

// Rewrite preprocessed MSL (`clang -E` output with line markers) into C++.
//   main_file: the file name the line markers use for the .metal source
//   display:   the name to show instead (the `path` given by the caller)
// Tokens from system headers (our compat headers are included with -isystem)
// are copied unchanged. Returns false with the messages in `errors` when the
// portability guard rejects the source or a kernel signature is unusable.
bool rewrite_msl(const std::string &preprocessed, const std::string &main_file,
                 const std::string &display, std::string &out, std::string &errors);

// Scan the raw source for #include of C/C++ standard-library headers.
bool check_includes(const std::string &source, const std::string &display,
                    std::string &errors);

}  // namespace camel_sim

#endif
