// translate_internal.h — the two halves of the simulator's MSL compiler:
//   translate.cpp          the driver: find clang, preprocess, cache, compile
//   translate_rewrite.cpp  the MSL -> C++ token rewrite, the portability
//                          guard and the generated entry wrappers
// Both are also part of the CUDA shim's translator (shim/cuda/translate_cuda.cpp),
// which uses the rewrite with TARGET_CUDA and the driver's helpers below.
#ifndef CAMEL_SIM_TRANSLATE_INTERNAL_H
#define CAMEL_SIM_TRANSLATE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <string>
#include <vector>

namespace camel_sim {

// TARGET_CHECK: the typed address-space check (translate.cpp): the user's code only, for
// a syntax-only pass of clang as C++ for OpenCL; device, constant, threadgroup and
// thread are kept (include/camel_check_msl.h makes them OpenCL's address spaces), and
// there are no entry wrappers.
enum Target { TARGET_SIM, TARGET_CUDA, TARGET_CHECK };

// Rewrite preprocessed MSL (`clang -E` output with line markers) into C++.
//   main_file: the file name the line markers use for the .metal source
//   display:   the name to show instead (the `path` given by the caller)
// Tokens from system headers (our compat headers are included with -isystem)
// are copied unchanged. Returns false with the messages in `errors` when the
// portability guard rejects the source or a kernel signature is unusable.
bool rewrite_msl(const std::string &preprocessed, const std::string &main_file,
                 const std::string &display, std::string &out, std::string &errors);
// only_kernel (rewrite_msl_for): entry wrappers and the description for that kernel only,
// as a function-constant specialisation needs (the other kernels' code is then unused).

// The same for a target. TARGET_CUDA: the output holds only the user's code
// (the caller puts the compat headers' text in front), closes the
// force_cuda_host_device pragma, and ends with the __global__ entry wrappers;
// `kernels` receives the description lines of shim/cuda/cuda_abi.h.
bool rewrite_msl_for(Target target, const std::string &preprocessed, const std::string &main_file,
                     const std::string &display, std::string &out, std::string &errors,
                     std::string &kernels, const std::string &only_kernel = "");

// Scan the raw source for #include of C/C++ standard-library headers: an
// `#include <name>` must be one of Metal's (<metal_*>, <simd/...>) or a project
// header found in one of `dirs` (the include path, see include_dirs()).
bool check_includes(const std::string &source, const std::string &display, std::string &errors,
                    const std::vector<std::string> &dirs, const char *prefix = "[sim] ");

// The same for what the source's headers include, from the preprocessed text: a
// system header (not one of the compat headers under `inc`) entered from a user file.
bool check_system_headers(const std::string &preprocessed, const std::string &inc,
                          const std::string &display, const std::string &main_file,
                          std::string &errors, const char *prefix = "[sim] ");

// The include path of a compile: the directory of `path` (if given), then the
// directories of $CAMEL_INCLUDE_PATH (':'-separated, made absolute), in clang's
// search order. `env` receives the variable's value (it goes into the cache key).
std::vector<std::string> include_dirs(const char *path, std::string &env);

// ---- helpers of translate.cpp, shared with the CUDA translator --------------
char *dup_string(const std::string &s);
bool file_exists(const std::string &p);
bool read_file(const std::string &path, std::string &out);
bool write_file(const std::string &path, const std::string &data);
std::string dirname_of(const std::string &p);
bool mkdirs(const std::string &dir);
std::string find_in_path(const std::string &name);
// Run argv with stdout+stderr going to log_path; the exit status or -1.
int run(const std::vector<std::string> &argv, const std::string &log_path);
void replace_all(std::string &s, const std::string &from, const std::string &to);
// clang's log made readable for the author of the .metal file (see translate.cpp).
std::string tidy_log(const std::string &log, const std::string &display, const std::string &source,
                     const std::string &inc);

// The typed address-space check (translate.cpp): its precompiled header in the cache
// directory `dir` ("" if it cannot be built), clang's command for the TARGET_CHECK
// translation in `file` (pch "": the header is included instead), and of that command's
// log the errors that are address-space mismatches in the user's code, spelled as MSL
// ("" if none).
std::string typed_check_pch(const std::string &cxx, const std::string &inc, const std::string &dir,
                            const std::string &key, const std::string &tmp);
std::vector<std::string> typed_check_command(const std::string &cxx, const std::string &inc,
                                             const std::string &file, const std::string &pch);
std::string typed_check_errors(const std::string &log, const std::string &inc, const std::string &display);

// Project headers in the cache key (translate.cpp): the headers in clang's -MMD
// output but `source`; `key` extended by their paths and contents (key itself for
// none); the list recorded for a key in <dir>/<key>.deps, and writing it (through tmp).
std::vector<std::string> read_deps(const std::string &dep_file, const std::string &source);
std::string key_with_headers(const std::string &key, const std::vector<std::string> &headers);
bool recorded_headers(const std::string &dir, const std::string &key, std::vector<std::string> &out);
void record_headers(const std::string &dir, const std::string &key, const std::vector<std::string> &headers,
                    const std::string &tmp);

// An exclusive lock on <path> (flock; made if missing) while one process compiles a cache
// entry: another process (pytest-xdist's workers, two programs) that misses the same entry
// waits, then finds it, instead of compiling the same source at the same time. Released
// when this goes out of scope (or the process ends); no lock where the file cannot be
// made (the compile then goes ahead unlocked, as before).
class CacheLock {
  public:
    explicit CacheLock(const std::string &path);
    ~CacheLock();
    CacheLock(const CacheLock &) = delete;
    CacheLock &operator=(const CacheLock &) = delete;

  private:
    int fd_ = -1;
};

// ---- function constants (translate.cpp) ---------------------------------------
// `constant T name [[function_constant(index)]];` at program scope in the user's code.
struct FunctionConstant {
    int index = 0;
    std::string type;  // as MSL spells it: "int", "float2"
    std::string name;
    int line = 0;      // of the .metal file (or header) that declares it
};

// Specialise the preprocessed text before the rewrite. values == nullptr: the library
// compile: every constant is T(0) and is_function_constant_defined(name) false (the
// library is only listed, never run, when it has constants). Otherwise values maps an
// index to the value's MSL expression (constant_literal); a constant with a value
// becomes `constant T name = value;`, is_function_constant_defined true; one without
// becomes a call of the undefined function camel_fc_missing_<index>_(), so a use the
// optimiser does not remove leaves an undefined symbol naming the index (the runtime
// reports it; missing_constant() reads it back). `found` receives the declarations.
// False with a message (naming the line) for a form that is not supported.
bool specialize_function_constants(std::string &preprocessed, const std::string &main_file,
                                   const std::string &display, const std::vector<std::pair<int, std::string>> *values,
                                   std::vector<FunctionConstant> &found, std::string &err,
                                   const char *prefix = "[sim] ");
// "index type name\n" per constant (the ABI's camel_library_function_constants text).
std::string function_constant_lines(const std::vector<FunctionConstant> &found);
// The MSL expression of a value of `type` ("int", "float2") from its little-endian
// bytes (camel_constant_value); "" with err set if type and code disagree.
std::string constant_literal(const std::string &type, uint32_t code, uint32_t components,
                             const uint8_t *bytes, std::string &err);
// The index in "camel_fc_missing_<index>_" within text (a loader's or assembler's
// message, a PTX file), or -1.
int missing_constant(const std::string &text);

// camel_sim_compile for a pipeline with function constants: the library of `kernel`
// only, with `values` (index, constant_literal) for the constants (spec NULL: the
// library compile, camel_sim_compile). Cached as camel_sim_compile is.
struct Specialisation {
    std::string kernel;
    std::vector<std::pair<int, std::string>> values;
};
int compile_library(const char *source, const char *path, const Specialisation *spec,
                    char **so_path, char **log);

// Two independent 64-bit FNV-style hashes, as 32 hex digits.
struct Hasher {
    uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;
    void add(const void *data, size_t n) {
        const unsigned char *p = (const unsigned char *)data;
        for (size_t i = 0; i < n; i++) {
            a = (a ^ p[i]) * 0x100000001b3ull;
            b = (b ^ p[i]) * 0x9e3779b97f4a7c15ull;
            b ^= b >> 29;
        }
    }
    void add(const std::string &s) {
        uint64_t n = s.size();
        add(&n, sizeof n);  // length first, so "ab"+"c" differs from "a"+"bc"
        add(s.data(), s.size());
    }
    std::string hex() {
        char buf[40];
        snprintf(buf, sizeof buf, "%016llx%016llx", (unsigned long long)a, (unsigned long long)b);
        return buf;
    }
};

// Add every file of dir (name and content, sorted by name; dot files skipped) to h: the
// compatibility headers' part of both targets' cache keys (translate.cpp).
void hash_dir(Hasher &h, const std::string &dir);

}  // namespace camel_sim

#endif
