// translate_cuda.cpp — the CUDA shim's translator: MSL in, one self-contained
// CUDA translation unit and PTX out (interface: cuda_abi.h).
//
//   camel_cuda_translate  1. portability guard on the raw source (#include <vector> ...)
//                         2. clang -E against shim/cuda/include (as system headers)
//                         3. the simulator's token rewrite with TARGET_CUDA
//                            (shim/front/translate_rewrite.cpp): the user's code,
//                            then one __global__ wrapper per kernel
//                         4. the compat headers' own text in front, #includes
//                            inlined, so the result compiles on its own
//   camel_cuda_compile    the above, then clang -x cuda --cuda-device-only -S
//                         -> PTX for sm_<arch>, cached on disk: key = hash of the
//                         source, its path, the arch, the compiler (path, size,
//                         mtime), the headers' contents, this library and the
//                         project headers it included (<key>.deps, as the simulator)
//
// Environment:
//   CAMEL_CUDA_CXX      compiler (default: clang++-19, clang++-18, clang++-17, clang++)
//   CAMEL_CUDA_INCLUDE  directory of the CUDA <metal_stdlib> (default: next to this library)
//   CAMEL_INCLUDE_PATH  ':'-separated directories searched for project headers (as the simulator)
//   CAMEL_CUDA_VERBOSE  1: print cache hits and compiler commands to stderr
//   XDG_CACHE_HOME      cache root (default ~/.cache); PTX goes to camel/cuda/
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "../front/translate_internal.h"
#include "cuda_abi.h"

using namespace camel_sim;

namespace {

// Bump when the generated code changes in a way the key would not notice.
const char kTranslatorVersion[] = "camel-cuda-translate 1";

bool verbose() {
    const char *v = getenv("CAMEL_CUDA_VERBOSE");
    return v && *v && strcmp(v, "0") != 0;
}

std::string real_path(const std::string &p) {
    char buf[PATH_MAX];
    return realpath(p.c_str(), buf) ? std::string(buf) : p;
}

std::string self_path() {
    Dl_info info;
    if (dladdr((void *)&camel_cuda_translate, &info) && info.dli_fname) return info.dli_fname;
    return "";
}

// clang with the NVPTX back end: $CAMEL_CUDA_CXX, else the newest clang++ on PATH.
std::string find_compiler(std::string &err) {
    const char *env = getenv("CAMEL_CUDA_CXX");
    if (env && *env) {
        std::string c = find_in_path(env);
        if (c.empty()) err = std::string("[cuda] CAMEL_CUDA_CXX=") + env + " was not found";
        return c;
    }
    static const char *const names[] = {"clang++-19", "clang++-18", "clang++-17", "clang++", nullptr};
    for (int i = 0; names[i]; i++) {
        std::string c = find_in_path(names[i]);
        if (!c.empty()) return c;
    }
    err = "[cuda] no clang++ found (tried clang++-19, clang++-18, clang++-17 and clang++ on PATH). "
          "The CUDA shim compiles MSL to PTX with clang (no CUDA toolkit needed): on Debian/Ubuntu "
          "`apt-get install clang-19`, or set CAMEL_CUDA_CXX to a clang++";
    return "";
}

// shim/cuda/include: $CAMEL_CUDA_INCLUDE, or next to this library
// (shim/build/libcamel_cuda.so -> shim/cuda/include).
std::string find_include_dir(std::string &err) {
    const char *env = getenv("CAMEL_CUDA_INCLUDE");
    if (env && *env) {
        if (file_exists(std::string(env) + "/camel_cuda_msl.h")) return real_path(env);
        err = std::string("[cuda] CAMEL_CUDA_INCLUDE=") + env + " has no camel_cuda_msl.h";
        return "";
    }
    std::string self = self_path();
    std::string dir = dirname_of(self.empty() ? "." : self);
    const char *const rel[] = {"/../cuda/include", "/cuda/include", "/include", nullptr};
    for (int i = 0; rel[i]; i++) {
        std::string cand = dir + rel[i];
        if (file_exists(cand + "/camel_cuda_msl.h")) return real_path(cand);
    }
    err = "[cuda] cannot find the CUDA shim's <metal_stdlib> next to " + self +
          " (looked in ../cuda/include); set CAMEL_CUDA_INCLUDE to shim/cuda/include";
    return "";
}

std::string usable_cache_dir(std::string &err) {
    const char *x = getenv("XDG_CACHE_HOME");
    std::string root;
    if (x && *x) {
        root = x;
    } else {
        const char *home = getenv("HOME");
        root = std::string(home && *home ? home : "/tmp") + "/.cache";
    }
    std::string dir = root + "/camel/cuda";
    if (mkdirs(dir) && access(dir.c_str(), W_OK) == 0) return dir;
    std::string first = dir + ": " + strerror(errno);
    const char *tmp = getenv("TMPDIR");
    dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/camel-cuda-cache-" + std::to_string(getuid());
    if (mkdirs(dir) && access(dir.c_str(), W_OK) == 0) return dir;
    err = "[cuda] cannot create a kernel cache directory (" + first + "; " + dir + ": " +
          strerror(errno) + "); set XDG_CACHE_HOME to a writable directory";
    return "";
}

// The headers' own text, with every #include "..." replaced by the file it
// names (once each, as #pragma once would), and #line markers so that
// clang's messages name the header files. `#ifdef __CAMEL_CUDA__` /
// `#ifndef __CAMEL_CUDA__` blocks are resolved here (the macro is always
// defined in a translation), so the simulator-only parts of the shared header
// are left out, not just skipped by the compiler.
bool inline_header(const std::string &path, std::set<std::string> &seen, std::string &out,
                   std::string &err) {
    std::string real = real_path(path);
    if (!seen.insert(real).second) return true;
    std::string text;
    if (!read_file(real, text)) {
        err = "[cuda] cannot read " + real;
        return false;
    }
    out += "#line 1 \"" + real + "\"\n";
    struct Cond {
        bool on_cuda;  // #ifdef/#ifndef __CAMEL_CUDA__ (resolved here), else copied
        bool live;     // its current branch is compiled
    };
    std::vector<Cond> conds;
    auto live = [&]() {
        for (auto &c : conds)
            if (!c.live) return false;
        return true;
    };
    int line = 0;
    bool resync = false;  // lines were left out: the next copied line needs a #line
    for (size_t i = 0; i < text.size();) {
        size_t e = text.find('\n', i);
        if (e == std::string::npos) e = text.size();
        std::string l = text.substr(i, e - i);
        i = e + 1;
        line++;
        size_t p = l.find_first_not_of(" \t");
        std::string d = p != std::string::npos && l[p] == '#' ? l.substr(p + 1) : "";
        d.erase(0, std::min(d.find_first_not_of(" \t"), d.size()));
        bool was_live = live();
        if (d.compare(0, 2, "if") == 0) {
            bool on_cuda = (d.compare(0, 5, "ifdef") == 0 || d.compare(0, 6, "ifndef") == 0) &&
                           d.find("__CAMEL_CUDA__") != std::string::npos;
            conds.push_back({on_cuda, on_cuda ? d.compare(0, 5, "ifdef") == 0 : true});
            if (on_cuda || !was_live) {
                resync = true;
                continue;
            }
        } else if ((d.compare(0, 4, "else") == 0 || d.compare(0, 5, "endif") == 0) && !conds.empty()) {
            Cond c = conds.back();
            if (d[1] == 'l') conds.back().live = c.on_cuda ? !c.live : c.live;
            else conds.pop_back();
            if (c.on_cuda || !live() || (d[1] != 'l' && !was_live)) {
                resync = true;
                continue;
            }
        } else if (!was_live) {
            resync = true;
            continue;
        }
        if (d.compare(0, 11, "pragma once") == 0) {
            resync = true;
            continue;
        }
        if (d.compare(0, 7, "include") == 0) {
            size_t q1 = d.find('"'), q2 = d.rfind('"');
            if (q1 != std::string::npos && q2 > q1) {
                std::string inc = dirname_of(real) + "/" + d.substr(q1 + 1, q2 - q1 - 1);
                if (!inline_header(inc, seen, out, err)) return false;
                resync = true;
                continue;
            }
        }
        if (resync) out += "#line " + std::to_string(line) + " \"" + real + "\"\n";
        resync = false;
        out += l + "\n";
    }
    return true;
}

// How simdgroup_matrix multiplies (camel_cuda_simd.h): CAMEL_CUDA_MATRIX=tf32x3
// (the default: tensor cores, 3xTF32) or fp32 (exact FMA on the CUDA cores).
// Returns the line the translation starts with, or false with err set.
bool matrix_mode_define(std::string &define, std::string &err) {
    const char *m = getenv("CAMEL_CUDA_MATRIX");
    std::string mode = m ? m : "";
    if (mode.empty() || mode == "tf32x3") define = "";
    else if (mode == "fp32") define = "#define CAMEL_CUDA_MATRIX_FP32 1\n";
    else {
        err = "[cuda] CAMEL_CUDA_MATRIX=" + mode + " is not a simdgroup_matrix mode: use tf32x3 "
              "(tensor cores, 3xTF32, the default) or fp32 (exact FP32 fma on the CUDA cores)";
        return false;
    }
    return true;
}

std::atomic<unsigned> g_counter{0};

std::string temp_base(const std::string &dir, const std::string &key) {
    return dir + "/" + key + ".tmp." + std::to_string(getpid()) + "." + std::to_string(g_counter++);
}

// MSL -> CUDA (steps 1-4 above). `tmp` is a path prefix for scratch files; `headers`
// receives the project headers the source included (clang -MMD, for the cache key).
int translate(const std::string &src, const char *path, const std::string &display,
              const std::string &cxx, const std::string &inc, const std::string &tmp,
              std::string &cuda, std::string &kernels, std::vector<std::string> &headers,
              std::string &err, const Specialisation *spec = nullptr) {
    std::string include_env;
    std::vector<std::string> dirs = include_dirs(path, include_env);
    if (!check_includes(src, display, err, dirs, "[cuda] ")) return 1;
    std::string src_file = tmp + ".metal", pre_file = tmp + ".pre", log_file = tmp + ".log";
    std::string dep_file = tmp + ".d";
    auto cleanup = [&]() {
        unlink(src_file.c_str());
        unlink(pre_file.c_str());
        unlink(log_file.c_str());
        unlink(dep_file.c_str());
    };
    if (!write_file(src_file, src)) {
        err = "[cuda] cannot write " + src_file + ": " + strerror(errno);
        return 1;
    }
    std::vector<std::string> pre = {cxx, "-E", "-x", "c++", "-std=c++17", "-isystem", inc,
                                    "-D__METAL_VERSION__=310", "-D__CAMEL_CUDA__=1"};
    for (const std::string &d : dirs) pre.push_back("-I" + d);  // the file's directory, CAMEL_INCLUDE_PATH
    pre.insert(pre.end(), {"-MMD", "-MF", dep_file, src_file, "-o", pre_file});
    int rc = run(pre, log_file);
    std::string clang_log, preprocessed, body;
    headers = read_deps(dep_file, src_file);
    read_file(log_file, clang_log);
    replace_all(clang_log, src_file, display);
    if (rc != 0) {
        err = clang_log.empty() ? "[cuda] could not run " + cxx : clang_log;
        cleanup();
        return 1;
    }
    if (!read_file(pre_file, preprocessed)) {
        err = "[cuda] cannot read " + pre_file;
        cleanup();
        return 1;
    }
    cleanup();
    if (!check_system_headers(preprocessed, inc, display, src_file, err, "[cuda] ")) return 1;
    std::vector<FunctionConstant> constants;
    if (!specialize_function_constants(preprocessed, src_file, display, spec ? &spec->values : nullptr,
                                       constants, err, "[cuda] "))
        return 1;
    if (!rewrite_msl_for(TARGET_CUDA, preprocessed, src_file, display, body, err, kernels,
                         spec ? spec->kernel : std::string()))
        return 1;
    for (const FunctionConstant &c : constants) {  // cuda_abi.h: "constant <index> <type> <name>"
        kernels += "constant " + std::to_string(c.index) + " " + c.type + " " + c.name + "\n";
        bool given = false;
        for (auto &v : spec ? spec->values : std::vector<std::pair<int, std::string>>())
            given = given || v.first == c.index;
        // A constant without a value: defined, so the PTX loads (ptxas compiles the other
        // kernels' unused functions too), never inlined, so a call the kernel's entry
        // reaches shows in the PTX (missing_reached)
        if (spec && !given)
            body += "\n__host__ __device__ __attribute__((noinline)) " + c.type + " camel_fc_missing_" +
                    std::to_string(c.index) + "_() { __builtin_trap(); __builtin_unreachable(); }\n";
    }
    std::string header, mode;
    if (!matrix_mode_define(mode, err)) return 1;
    std::set<std::string> seen;
    if (!inline_header(inc + "/metal_stdlib", seen, header, err)) return 1;
    cuda = "// " + display + ": Metal Shading Language translated to CUDA by camel\n"
           "// (shim/cuda/translate_cuda.cpp). Self-contained; compile it with\n"
           "//   clang++-19 -x cuda --cuda-device-only --cuda-gpu-arch=sm_90 -nocudainc -nocudalib -O3 -S\n"
           "//     -mllvm -unroll-threshold=5000 -mllvm -inline-threshold=5000 (as camel does)\n"
           "// It holds, in order: the MSL library for CUDA (shim/cuda/include and the\n"
           "// shared shim/front/include), your kernels as rewritten (address spaces\n"
           "// dropped, threadgroup arrays as __shared__, float4(a, b) as __camel_make),\n"
           "// and one extern \"C\" __global__ camel_<kernel name> wrapper per kernel.\n"
           "#define __METAL_VERSION__ 310\n" +
           mode + header + body;
    return 0;
}

// Hash of the headers (content, so edits count): shim/cuda/include, the MSL
// library it includes (shim/front/include) and the ABI headers.
void hash_headers(Hasher &h, const std::string &inc) {
    hash_dir(h, inc);
    hash_dir(h, inc + "/../../front/include");
    std::string content;
    if (read_file(inc + "/../cuda_abi.h", content)) h.add(content);
}

struct Setup {
    std::string cxx, inc, display;
};
bool setup(const char *path, Setup &s, std::string &err) {
    s.display = path && *path ? path : "program_source";
    s.cxx = find_compiler(err);
    if (s.cxx.empty()) return false;
    s.inc = find_include_dir(err);
    return !s.inc.empty();
}

}  // namespace

extern "C" int camel_cuda_translate(const char *source, const char *path, char **cuda_source,
                                    char **kernels, char **log) {
    *cuda_source = nullptr;
    *kernels = nullptr;
    *log = nullptr;
    std::string err, cuda, desc;
    std::vector<std::string> headers;
    Setup s;
    if (!setup(path, s, err)) {
        *log = dup_string(err);
        return 1;
    }
    const char *tmpdir = getenv("TMPDIR");
    std::string tmp = temp_base(tmpdir && *tmpdir ? tmpdir : "/tmp", "camel-cuda-translate");
    if (translate(source ? source : "", path, s.display, s.cxx, s.inc, tmp, cuda, desc, headers, err)) {
        *log = dup_string(err);
        return 1;
    }
    *cuda_source = dup_string(cuda);
    *kernels = dup_string(desc);
    return 0;
}

static int compile_ptx(const char *source, const char *path, int arch, const Specialisation *spec,
                       char **ptx, char **kernels, char **log);

extern "C" int camel_cuda_compile(const char *source, const char *path, int arch, char **ptx,
                                  char **kernels, char **log) {
    return compile_ptx(source, path, arch, nullptr, ptx, kernels, log);
}

extern "C" int camel_cuda_compile_specialised(const char *source, const char *path, int arch,
                                              const char *kernel, const char *values, char **ptx,
                                              char **kernels, char **log) {
    Specialisation spec;
    spec.kernel = kernel ? kernel : "";
    for (const char *l = values ? values : ""; *l;) {  // "<index> <expression>\n"
        const char *eol = strchr(l, '\n');
        std::string line(l, eol ? eol - l : strlen(l));
        l = eol ? eol + 1 : l + line.size();
        size_t sp = line.find(' ');
        if (sp != std::string::npos) spec.values.push_back({atoi(line.c_str()), line.substr(sp + 1)});
    }
    std::sort(spec.values.begin(), spec.values.end());
    return compile_ptx(source, path, arch, &spec, ptx, kernels, log);
}

namespace {
// The PTX of a specialisation still calls camel_fc_missing_<i>_: the kernel uses
// constant i, which has no value. The message names it (from the description lines).
// PTX keeps every function of external linkage (.visible), used or not: the calls
// reachable from the kernel's entry decide. The constant of a camel_fc_missing_<i>_
// that the entry reaches, or -1.
int missing_reached(const std::string &ptx, const std::string &desc) {
    std::string entry;  // "kernel <n> <host> <barrier> <simd> <entry>"
    size_t k = desc.find("kernel ");
    if (k != std::string::npos) {
        std::string l = desc.substr(k, desc.find('\n', k) - k);
        size_t sp = l.rfind(' ');
        if (sp != std::string::npos) entry = l.substr(sp + 1);
    }
    auto ident = [](char c) { return isalnum((unsigned char)c) || c == '_' || c == '$'; };
    std::map<std::string, std::string> body;  // function name -> its text
    std::string current;
    for (size_t i = 0; i < ptx.size();) {
        size_t e = ptx.find('\n', i);
        if (e == std::string::npos) e = ptx.size();
        std::string l = ptx.substr(i, e - i);
        i = e + 1;
        l = l.substr(0, l.find("//"));  // "// .globl f  // -- Begin function f" names f
        size_t f = l.find(".func");
        if (f == std::string::npos) f = l.find(".entry");
        if (f != std::string::npos && l.find_first_not_of(" \t") < f + 1) {
            size_t p = l.find_first_of(" \t(", f);
            while (p < l.size() && (l[p] == ' ' || l[p] == '\t')) p++;
            if (p < l.size() && l[p] == '(') p = l.find(')', p) + 1;  // (.param ...) return value
            while (p < l.size() && (l[p] == ' ' || l[p] == '\t')) p++;
            size_t q = p;
            while (q < l.size() && ident(l[q])) q++;
            current = l.substr(p, q - p);
            body[current];
            continue;
        }
        if (!current.empty()) body[current] += l + "\n";
    }
    std::vector<std::string> todo = {entry};
    std::set<std::string> seen = {entry};
    while (!todo.empty()) {
        std::string fn = todo.back();
        todo.pop_back();
        int m = missing_constant(fn);
        if (m >= 0) return m;
        const std::string &b = body[fn];
        for (size_t i = 0; i < b.size();) {
            if (!ident(b[i])) {
                i++;
                continue;
            }
            size_t j = i;
            while (j < b.size() && ident(b[j])) j++;
            std::string w = b.substr(i, j - i);
            i = j;
            if (body.count(w) && seen.insert(w).second) todo.push_back(w);
        }
    }
    return -1;
}

bool missing_in_ptx(const std::string &ptx, const std::string &desc, const Specialisation *spec,
                    std::string &err) {
    int missing = spec && missing_constant(ptx) >= 0 ? missing_reached(ptx, desc) : -1;
    if (missing < 0) return false;
    std::string name = "#" + std::to_string(missing), type = "?";
    std::string tag = "constant " + std::to_string(missing) + " ";
    for (size_t p = desc.find(tag); p != std::string::npos; p = std::string::npos) {
        size_t e = desc.find('\n', p);
        std::string rest = desc.substr(p + tag.size(), e - p - tag.size());
        size_t sp = rest.find(' ');
        if (sp != std::string::npos) {
            type = rest.substr(0, sp);
            name = rest.substr(sp + 1);
        }
    }
    err = "[cuda] kernel '" + spec->kernel + "' uses function constant '" + name + "' (index " +
          std::to_string(missing) + ", " + type + "), which has no value: give it one when making "
          "the pipeline, or guard its uses with is_function_constant_defined(" + name +
          ") (Metal: newFunctionWithName:constantValues:error: fails the same way)";
    return true;
}
}  // namespace

static int compile_ptx(const char *source, const char *path, int arch, const Specialisation *spec,
                       char **ptx, char **kernels, char **log) {
    *ptx = nullptr;
    *kernels = nullptr;
    *log = nullptr;
    std::string err;
    std::string src = source ? source : "";
    Setup s;
    if (!setup(path, s, err)) {
        *log = dup_string(err);
        return 1;
    }
    if (arch < 50 || arch > 1000) {
        *log = dup_string("[cuda] arch " + std::to_string(arch) + " is not a compute capability "
                          "such as 80 (A100) or 90 (H100/H200)");
        return 1;
    }

    Hasher h;
    h.add(std::string(kTranslatorVersion));
    h.add(src);
    h.add(s.display);
    h.add(std::to_string(arch));
    std::string mode;
    if (!matrix_mode_define(mode, err)) {
        *log = dup_string(err);
        return 1;
    }
    h.add(mode);
    std::string cxx_real = real_path(s.cxx);
    struct stat st;
    h.add(cxx_real);
    if (stat(cxx_real.c_str(), &st) == 0) {
        h.add(&st.st_size, sizeof st.st_size);
        h.add(&st.st_mtime, sizeof st.st_mtime);
    }
    std::string self = self_path();
    if (!self.empty() && stat(self.c_str(), &st) == 0) {  // a rebuilt translator
        h.add(&st.st_size, sizeof st.st_size);
        h.add(&st.st_mtime, sizeof st.st_mtime);
    }
    hash_headers(h, s.inc);
    std::string include_env;
    for (const std::string &d : include_dirs(path, include_env)) h.add(d);  // where headers are found
    if (spec) {  // a specialisation: one kernel, the function constants' values
        h.add(std::string("specialised"));
        h.add(spec->kernel);
        for (auto &v : spec->values) {
            h.add(std::to_string(v.first));
            h.add(v.second);
        }
    }
    std::string key = h.hex();
    std::string dir = usable_cache_dir(err);
    if (dir.empty()) {
        *log = dup_string(err);
        return 1;
    }
    // the project headers the last compile of this key read count too (translate.cpp)
    std::vector<std::string> headers;
    recorded_headers(dir, key, headers);
    std::string sm = ".sm_" + std::to_string(arch);
    std::string base = dir + "/" + key_with_headers(key, headers) + sm;
    std::string ptx_text, desc;
    auto hit = [&]() {
        if (verbose()) fprintf(stderr, "[cuda] cache hit %s -> %s.ptx\n", s.display.c_str(), base.c_str());
        if (missing_in_ptx(ptx_text, desc, spec, err)) {
            *log = dup_string(err);
            return 1;
        }
        *ptx = dup_string(ptx_text);
        *kernels = dup_string(desc);
        return 0;
    };
    if (read_file(base + ".ptx", ptx_text) && read_file(base + ".kernels", desc)) return hit();
    // a miss: compile under the entry's lock (one per arch: the archs compile side by side);
    // whoever held it may have just made the entry (translate.cpp's CacheLock)
    camel_sim::CacheLock lock(dir + "/" + key + sm + ".lock");
    recorded_headers(dir, key, headers);
    base = dir + "/" + key_with_headers(key, headers) + sm;
    if (read_file(base + ".ptx", ptx_text) && read_file(base + ".kernels", desc)) return hit();

    std::string tmp = temp_base(dir, key), cuda;
    if (translate(src, path, s.display, s.cxx, s.inc, tmp, cuda, desc, headers, err, spec)) {
        *log = dup_string(err);
        return 1;
    }
    base = dir + "/" + key_with_headers(key, headers) + sm;
    std::string cu_file = tmp + ".cu", ptx_file = tmp + ".ptx", log_file = tmp + ".log",
                desc_file = tmp + ".kernels";
    auto cleanup = [&]() {
        unlink(cu_file.c_str());
        unlink(ptx_file.c_str());
        unlink(log_file.c_str());
        unlink(desc_file.c_str());
    };
    if (!write_file(cu_file, cuda)) {
        *log = dup_string("[cuda] cannot write " + cu_file + ": " + strerror(errno));
        cleanup();
        return 1;
    }
    // fp-contract=on as the simulator (fma only within an expression);
    // no fast math: IEEE division and square root, denormals kept.
    // The unroll and inline thresholds: a kernel's register arrays (GEMM v5-v11's
    // accumulators, simdgroup_matrix fragments) stay in registers only when the
    // loops over them are unrolled and the helpers that take them by reference
    // are inlined; with clang's defaults v5-v11 keep them in local (device)
    // memory and load them back every K step (seen as ld.local in the PTX).
    std::vector<std::string> cc = {s.cxx, "-x", "cuda", "--cuda-device-only",
                                   "--cuda-gpu-arch=sm_" + std::to_string(arch), "-nocudainc",
                                   "-nocudalib", "-O3", "-mllvm", "-unroll-threshold=5000",
                                   "-mllvm", "-inline-threshold=5000", "-S", "-std=c++17",
                                   "-ffp-contract=on",
                                   "-Wno-unknown-cuda-version", "-Wno-unused-value",
                                   "-Wno-unknown-pragmas", "-ferror-limit=20", cu_file, "-o",
                                   ptx_file};
    if (verbose()) fprintf(stderr, "[cuda] compiling %s -> %s.ptx\n", s.display.c_str(), base.c_str());
    int rc = run(cc, log_file);
    std::string clang_log;
    read_file(log_file, clang_log);
    replace_all(clang_log, cu_file, s.display + " (translated)");
    clang_log = tidy_log(clang_log, s.display, src, dirname_of(dirname_of(s.inc)));
    if (rc != 0 || !read_file(ptx_file, ptx_text)) {
        *log = dup_string("[cuda] compiling " + s.display + " to PTX for sm_" + std::to_string(arch) +
                          " failed:\n" + (clang_log.empty() ? "could not run " + s.cxx : clang_log));
        cleanup();
        return 1;
    }
    // keep the translation next to the PTX, for the curious; the .kernels file
    // last, so a reader that finds it finds the PTX too
    write_file(desc_file, desc);
    rename(cu_file.c_str(), (base + ".cu").c_str());
    if (rename(ptx_file.c_str(), (base + ".ptx").c_str()) != 0 ||
        rename(desc_file.c_str(), (base + ".kernels").c_str()) != 0) {
        *log = dup_string("[cuda] cannot write the PTX cache entry " + base + ".ptx: " + strerror(errno));
        cleanup();
        return 1;
    }
    record_headers(dir, key, headers, tmp + ".deps");
    cleanup();
    if (missing_in_ptx(ptx_text, desc, spec, err)) {
        *log = dup_string(err);
        return 1;
    }
    *ptx = dup_string(ptx_text);
    *kernels = dup_string(desc);
    return 0;
}

extern "C" void camel_cuda_free(void *p) { free(p); }
