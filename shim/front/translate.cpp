// translate.cpp — camel_sim_compile: a .metal source in, a shared object out.
//
//   1. look in the on-disk cache: key = hash of the source, its path, the
//      flags (CAMEL_SIM_SANITIZE), the compiler (path, size, mtime), the
//      compat headers' contents and this library, and of the project headers
//      the last compile of that key read (<key>.deps, from clang -MMD); a hit
//      costs a hash, reading those headers and a stat
//   2. portability guard on the raw source (#include <vector> ...)
//   3. clang -E against the compat headers (shim/sim/include, as system headers)
//   4. the token rewrite (translate_rewrite.cpp): MSL -> C++ plus entry wrappers
//   4b. the typed address-space check (typed_check_errors below), a second clang
//      run beside step 5: the code as C++ for OpenCL, syntax only
//   5. clang++ -O2 -shared -> <cache>/<key>.so, written to a temporary name
//      and renamed, so parallel processes never see half a file
//
// Environment:
//   CAMEL_SIM_CXX       compiler to use (default: clang++-19 ... clang++-16, clang++)
//   CAMEL_SIM_INCLUDE   directory of the compat <metal_stdlib>
//   CAMEL_INCLUDE_PATH  ':'-separated directories searched for project headers
//                       (#include <mlx/...> or "..."), after the source's own
//   CAMEL_SIM_SANITIZE  address,undefined: build kernels with ASan/UBSan
//   CAMEL_SIM_VERBOSE   1: print cache hits and compiler commands to stderr
//   CAMEL_SIM_TYPED_CHECK      0: no typed address-space check (step 4b)
//   CAMEL_SIM_TYPED_CHECK_LOG  file: append the check's errors in user code, kept or not
//   XDG_CACHE_HOME      cache root (default ~/.cache); kernels go to camel/sim/
#include "translate.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "translate_internal.h"

extern char **environ;

// Not in an anonymous namespace: the CUDA translator shares these helpers
// (declared in translate_internal.h).
namespace camel_sim {

// Bump when the generated code changes in a way the key would not notice.
const char kTranslatorVersion[] = "camel-sim-translate 1";

char *dup_string(const std::string &s) {
    char *p = (char *)malloc(s.size() + 1);
    memcpy(p, s.c_str(), s.size() + 1);
    return p;
}

bool verbose() {
    const char *v = getenv("CAMEL_SIM_VERBOSE");
    return v && *v && strcmp(v, "0") != 0;
}

bool file_exists(const std::string &p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

bool read_file(const std::string &path, std::string &out) {
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) return false;
    out.clear();
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    fclose(f);
    return true;
}

bool write_file(const std::string &path, const std::string &data) {
    FILE *f = fopen(path.c_str(), "wb");
    if (!f) return false;
    bool ok = fwrite(data.data(), 1, data.size(), f) == data.size();
    return fclose(f) == 0 && ok;
}

std::string dirname_of(const std::string &p) {
    size_t s = p.rfind('/');
    if (s == std::string::npos) return ".";
    if (s == 0) return "/";
    return p.substr(0, s);
}

bool mkdirs(const std::string &dir) {
    if (dir.empty() || file_exists(dir)) return true;
    if (!mkdirs(dirname_of(dir))) return false;
    return mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST;
}

// The compiler: $CAMEL_SIM_CXX, else the newest clang++-N on PATH.
std::string find_in_path(const std::string &name) {
    if (name.find('/') != std::string::npos) return file_exists(name) ? name : "";
    const char *path = getenv("PATH");
    std::string p = path ? path : "/usr/bin:/bin";
    size_t i = 0;
    while (i <= p.size()) {
        size_t e = p.find(':', i);
        if (e == std::string::npos) e = p.size();
        std::string dir = p.substr(i, e - i);
        if (dir.empty()) dir = ".";
        std::string cand = dir + "/" + name;
        if (access(cand.c_str(), X_OK) == 0) return cand;
        i = e + 1;
    }
    return "";
}

std::string find_compiler(std::string &err) {
    const char *env = getenv("CAMEL_SIM_CXX");
    if (env && *env) {
        std::string c = find_in_path(env);
        if (c.empty()) err = std::string("[sim] CAMEL_SIM_CXX=") + env + " was not found";
        return c;
    }
    static const char *const names[] = {"clang++-19", "clang++-18", "clang++-17", "clang++-16",
                                        "clang++", nullptr};
    for (int i = 0; names[i]; i++) {
        std::string c = find_in_path(names[i]);
        if (!c.empty()) return c;
    }
    err = "[sim] no clang++ found (tried clang++-19 ... clang++-16 and clang++ on PATH). The Metal "
          "simulator compiles kernels with clang >= 16: on Debian/Ubuntu `apt-get install clang-19`, "
          "or set CAMEL_SIM_CXX to a clang++";
    return "";
}

// The directory holding the compat <metal_stdlib>: $CAMEL_SIM_INCLUDE, or
// next to this library (shim/build/libcamel_sim.so -> shim/sim/include).
std::string self_path() {
    Dl_info info;
    if (dladdr((void *)&camel_sim_compile, &info) && info.dli_fname) return info.dli_fname;
    return "";
}

std::string find_include_dir(std::string &err) {
    const char *env = getenv("CAMEL_SIM_INCLUDE");
    if (env && *env) {
        if (file_exists(std::string(env) + "/metal_stdlib")) return env;
        err = std::string("[sim] CAMEL_SIM_INCLUDE=") + env + " has no metal_stdlib";
        return "";
    }
    std::string self = self_path();
    std::string dir = dirname_of(self.empty() ? "." : self);
    const char *const rel[] = {"/../sim/include", "/sim/include", "/include", "/../include", nullptr};
    for (int i = 0; rel[i]; i++) {
        std::string cand = dir + rel[i];
        if (file_exists(cand + "/metal_stdlib")) {
            char real[4096];
            if (realpath(cand.c_str(), real)) return real;
            return cand;
        }
    }
    err = "[sim] cannot find the simulator's <metal_stdlib> next to " + self +
          " (looked in ../sim/include); set CAMEL_SIM_INCLUDE to shim/sim/include";
    return "";
}

std::string cache_dir() {
    const char *x = getenv("XDG_CACHE_HOME");
    std::string root;
    if (x && *x) {
        root = x;
    } else {
        const char *home = getenv("HOME");
        root = std::string(home && *home ? home : "/tmp") + "/.cache";
    }
    return root + "/camel/sim";
}

// The cache directory, created if needed; when the home cache cannot be
// written (a read-only home in CI), a per-user directory under $TMPDIR.
std::string usable_cache_dir(std::string &err) {
    std::string dir = cache_dir();
    if (mkdirs(dir) && access(dir.c_str(), W_OK) == 0) return dir;
    std::string first = dir + ": " + strerror(errno);
    const char *tmp = getenv("TMPDIR");
    dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/camel-sim-cache-" + std::to_string(getuid());
    if (mkdirs(dir) && access(dir.c_str(), W_OK) == 0) return dir;
    err = "[sim] cannot create a kernel cache directory (" + first + "; " + dir + ": " +
          strerror(errno) + "); set XDG_CACHE_HOME to a writable directory";
    return "";
}

// Sanitizer flags from CAMEL_SIM_SANITIZE ("address", "undefined", or both).
bool sanitize_flags(std::string &value, std::string &err) {
    const char *v = getenv("CAMEL_SIM_SANITIZE");
    value = v ? v : "";
    if (value.empty() || value == "0") {
        value.clear();
        return true;
    }
    size_t i = 0;
    while (i <= value.size()) {
        size_t e = value.find(',', i);
        if (e == std::string::npos) e = value.size();
        std::string s = value.substr(i, e - i);
        if (s != "address" && s != "undefined") {
            err = "[sim] CAMEL_SIM_SANITIZE=" + value + ": unknown sanitizer '" + s +
                  "' (use address, undefined or address,undefined)";
            return false;
        }
        i = e + 1;
    }
    return true;
}

// Start argv with stdout+stderr going to log_path: its pid, or -1.
pid_t start(const std::vector<std::string> &argv, const std::string &log_path) {
    if (verbose()) {
        std::string cmd;
        for (auto &a : argv) cmd += a + " ";
        fprintf(stderr, "[sim] %s\n", cmd.c_str());
    }
    std::vector<char *> args;
    for (auto &a : argv) args.push_back((char *)a.c_str());
    args.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid;
    int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    return rc == 0 ? pid : -1;
}

// The exit status of a started process (or -1).
int finish(pid_t pid) {
    if (pid < 0) return -1;
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Run argv with stdout+stderr going to log_path. Returns the exit status
// (or -1 if it could not start).
int run(const std::vector<std::string> &argv, const std::string &log_path) {
    return finish(start(argv, log_path));
}

void replace_all(std::string &s, const std::string &from, const std::string &to) {
    if (from.empty()) return;
    size_t p = 0;
    while ((p = s.find(from, p)) != std::string::npos) {
        s.replace(p, from.size(), to);
        p += to.size();
    }
}

// Make clang's log readable for someone who wrote MSL, not our C++:
//  - a diagnostic in the .metal file shows the original source line (clang
//    shows the rewritten one); the caret stays only where the two agree
//  - diagnostics inside the compat headers lose their source snippets (a
//    whole macro expansion on one line), and of the "candidate function not
//    viable" notes listing every overload of max() only the first 3 are kept
std::string tidy_log(const std::string &log, const std::string &display, const std::string &source,
                     const std::string &inc) {
    std::vector<std::string> src_lines;
    for (size_t i = 0; i <= source.size();) {
        size_t e = source.find('\n', i);
        if (e == std::string::npos) e = source.size();
        src_lines.push_back(source.substr(i, e - i));
        i = e + 1;
    }
    enum { OTHER, USER, HEADER, HIDDEN } cur = OTHER;
    bool drop_caret = false;
    int candidates = 0, hidden = 0;
    std::string out;
    auto flush_hidden = [&]() {
        if (hidden) out += "note: " + std::to_string(hidden) + " more candidates in <metal_stdlib> not shown\n";
        hidden = 0;
        candidates = 0;
    };
    for (size_t i = 0; i < log.size();) {
        size_t e = log.find('\n', i);
        if (e == std::string::npos) e = log.size();
        std::string l = log.substr(i, e - i);
        i = e + 1;
        // a snippet line "   12 | code" or a caret line "      |   ^~~"
        size_t bar = l.find(" | ");
        if (bar == std::string::npos && l.size() >= 2 && l.compare(l.size() - 2, 2, " |") == 0) bar = l.size() - 2;
        bool snippet = bar != std::string::npos && l.find_first_not_of(" 0123456789") == bar + 1;
        if (snippet) {
            if (cur == HEADER || cur == HIDDEN) continue;
            if (cur == USER) {
                std::string num = l.substr(0, bar);
                size_t d = num.find_first_of("0123456789");
                if (d != std::string::npos) {  // the code line
                    size_t n = (size_t)atol(num.c_str() + d);
                    std::string shown = bar + 3 <= l.size() ? l.substr(bar + 3) : "";
                    if (n >= 1 && n <= src_lines.size() && src_lines[n - 1] != shown) {
                        l = l.substr(0, bar + 3) + src_lines[n - 1];
                        drop_caret = true;
                    } else {
                        drop_caret = false;
                    }
                } else if (drop_caret) {
                    continue;  // the caret would point into the rewritten line
                }
            }
            out += l + "\n";
            continue;
        }
        bool in_header = !inc.empty() && l.compare(0, inc.size(), inc) == 0;
        bool is_note = l.find(": note: ") != std::string::npos;
        if (!is_note) flush_hidden();
        if (in_header && is_note &&
            (l.find("candidate function") != std::string::npos ||
             l.find("candidate template") != std::string::npos)) {
            if (++candidates > 3) {
                hidden++;
                cur = HIDDEN;
                continue;
            }
        }
        cur = in_header ? HEADER : l.compare(0, display.size() + 1, display + ":") == 0 ? USER : OTHER;
        out += l + "\n";
    }
    flush_hidden();
    return out;
}

std::atomic<unsigned> g_counter{0};

// half arithmetic: a GPU rounds every half operation to half; clang on x86
// by default keeps half expressions in float and rounds once at the end.
// -ffloat16-excess-precision=none (clang >= 17) rounds like the GPU (and the
// bfloat16 twin for bfloat). Probed
// once per process, and only when something is compiled.
bool half_rounding_flag(const std::string &cxx, const std::string &log_file) {
    static std::mutex m;
    static std::string probed;  // the compiler the answer is for
    static bool answer = false;
    std::lock_guard<std::mutex> lock(m);
    if (probed != cxx) {
        std::vector<std::string> probe = {cxx, "-Xclang", "-ffloat16-excess-precision=none",
                                          "-Xclang", "-fbfloat16-excess-precision=none",
                                          "-fsyntax-only", "-x", "c++", "/dev/null"};
        answer = run(probe, log_file) == 0;
        probed = cxx;
    }
    return answer;
}

void hash_dir(Hasher &h, const std::string &dir) {
    std::vector<std::string> names;
    if (DIR *d = opendir(dir.c_str())) {
        while (dirent *e = readdir(d))
            if (e->d_name[0] != '.') names.push_back(e->d_name);
        closedir(d);
    }
    std::sort(names.begin(), names.end());
    std::string content;
    for (auto &n : names) {
        h.add(n);
        if (read_file(dir + "/" + n, content)) h.add(content);
    }
}

// Hash of what the compat headers and the ABI say (content, so edits count): the
// simulator's include dir (shim/sim/include), the MSL library its headers include
// (shim/front/include) and the kernel-library ABI (shim/front/sim_abi.h).
void hash_headers(Hasher &h, const std::string &inc) {
    hash_dir(h, inc);
    hash_dir(h, inc + "/../../front/include");
    std::string content;
    if (read_file(inc + "/../../front/sim_abi.h", content)) h.add(content);
}

std::vector<std::string> include_dirs(const char *path, std::string &env) {
    std::vector<std::string> dirs;
    if (path && *path) dirs.push_back(dirname_of(path));  // #include "common.h" next to the file
    const char *v = getenv("CAMEL_INCLUDE_PATH");
    env = v ? v : "";
    for (size_t i = 0; i < env.size();) {
        size_t e = env.find(':', i);
        if (e == std::string::npos) e = env.size();
        std::string d = env.substr(i, e - i);
        char real[4096];
        if (!d.empty()) dirs.push_back(realpath(d.c_str(), real) ? real : d);
        i = e + 1;
    }
    return dirs;
}

// ---- project headers in the cache key ------------------------------------
// The key hashes the source, not what it includes. So each compile has clang list
// the project headers it read (-MMD: the compat headers, system headers, are left
// out) and records them in <cache>/<key>.deps, one absolute path a line; the library
// is then stored under a second key that also hashes those headers' contents. A
// lookup reads <key>.deps (if any) and hashes the headers as they are now, so an
// edited header makes a new key. A source that includes no project header has no
// .deps and its library is <key>.so, as before.

// The headers in clang's dependency file ("out: src.metal a.h \\\n  b\\ c.h"),
// without `source` itself, as absolute paths.
std::vector<std::string> read_deps(const std::string &dep_file, const std::string &source) {
    std::vector<std::string> out;
    std::string text;
    if (!read_file(dep_file, text)) return out;
    size_t colon = text.find(": ");
    if (colon == std::string::npos) return out;
    std::string cur;
    auto flush = [&]() {
        if (!cur.empty() && cur != source) {
            char real[4096];
            out.push_back(realpath(cur.c_str(), real) ? real : cur);
        }
        cur.clear();
    };
    for (size_t i = colon + 2; i < text.size(); i++) {
        char c = text[i];
        if (c == '\\' && i + 1 < text.size() && (text[i + 1] == '\n' || text[i + 1] == '\r')) {
            flush();  // a continuation line
            i++;
        } else if (c == '\\' && i + 1 < text.size() && (text[i + 1] == ' ' || text[i + 1] == '#')) {
            cur += text[++i];
        } else if (c == '$' && i + 1 < text.size() && text[i + 1] == '$') {
            cur += text[++i];
        } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            flush();
        } else {
            cur += c;
        }
    }
    flush();
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
}

// key, extended by each header's path and content (a missing one counts as missing).
std::string key_with_headers(const std::string &key, const std::vector<std::string> &headers) {
    if (headers.empty()) return key;
    Hasher h;
    h.add(key);
    std::string content;
    for (const std::string &p : headers) {
        h.add(p);
        if (read_file(p, content)) h.add(content);
        else h.add(std::string("\0missing", 8));
    }
    return h.hex();
}

// The headers the last compile of `key` read: <dir>/<key>.deps. False if there is none.
bool recorded_headers(const std::string &dir, const std::string &key, std::vector<std::string> &out) {
    std::string text;
    out.clear();
    if (!read_file(dir + "/" + key + ".deps", text)) return false;
    for (size_t i = 0; i < text.size();) {
        size_t e = text.find('\n', i);
        if (e == std::string::npos) e = text.size();
        if (e > i) out.push_back(text.substr(i, e - i));
        i = e + 1;
    }
    return true;
}

// Record them (or, for none, remove a stale record); written to `tmp` and renamed.
void record_headers(const std::string &dir, const std::string &key, const std::vector<std::string> &headers,
                    const std::string &tmp) {
    std::string deps = dir + "/" + key + ".deps";
    if (headers.empty()) {
        unlink(deps.c_str());
        return;
    }
    std::string text;
    for (const std::string &p : headers) text += p + "\n";
    if (write_file(tmp, text)) rename(tmp.c_str(), deps.c_str());
    unlink(tmp.c_str());
}

CacheLock::CacheLock(const std::string &path) {
    fd_ = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) return;
    while (flock(fd_, LOCK_EX) != 0) {
        if (errno != EINTR) {
            close(fd_);
            fd_ = -1;
            return;
        }
    }
}

CacheLock::~CacheLock() {
    if (fd_ >= 0) close(fd_);  // releases the lock
}

// ---- the typed address-space check -------------------------------------------
// The translation erases address spaces (a CPU has one), so the C++ compile cannot
// see a pointer or reference that changes address space. The typed check compiles
// the kernel's code a second time, syntax only, as C++ for OpenCL: the rewrite
// (TARGET_CHECK) keeps device, constant, threadgroup and thread, which
// include/camel_check_msl.h makes __global, __constant, __local and __private (every
// local variable is __private there, as it is thread in MSL), and makes the
// simulator's own header parse. Of clang's errors it keeps those that are such a
// mismatch:
//   - in the user's files (an error inside the compat header is not the kernel's);
//   - explained by two address spaces: the message or a note names two (cannot pass
//     pointer to address space 'A' as a pointer to address space 'B', cannot bind
//     reference in address space 'A' to ...), or two types in it are the same but for
//     the address space of what they point or refer to, in a message about a
//     conversion (cannot initialize 'A' with 'B', assigning, comparisons, casts,
//     returns, conflicting deductions) or about a ?: of two pointers;
//   - and __generic takes no part: the header's unqualified pointers and references,
//     the implicit copy constructor, and in the user's code what the rewrite leaves
//     unqualified (pointers to a template parameter, auto or a template-id, a
//     constructor's `this` and parameters; it writes `thread` where MSL before 4.1
//     means it, Rewriter::implicit_thread) are __generic there, which takes any address
//     space but __constant; in MSL they take (or are) what the code gives them, so
//     such an error is not Metal's.
// Any other error (an OpenCL rule that Metal does not have) is not the check's
// business. It runs beside the C++ compile, and only matters when that succeeds.
// CAMEL_SIM_TYPED_CHECK=0 turns it off; CAMEL_SIM_TYPED_CHECK_LOG=file appends every
// error of the check's in the user's code to that file, kept or not (for auditing).

// The language and include options of the check (and of its precompiled header).
static std::vector<std::string> typed_check_flags(const std::string &cxx, const std::string &inc) {
    return {cxx, "-x", "clcpp", "-cl-std=clc++1.0", "-cl-no-stdinc", "-fsyntax-only", "-w",
            "-fno-color-diagnostics", "-isystem", inc, "-D__METAL_VERSION__=310", "-D__METAL_SIM__=1",
            // the header has errors of its own (OpenCL rules it does not follow): kept in the PCH
            "-Xclang", "-fallow-pch-with-compiler-errors"};
}

// The check's header, precompiled once per compiler, header directory and header
// contents (`key`) into the cache directory: it is most of the check's time (0.1 s a compile, 0.01 s with the
// PCH). "" when it cannot be built (the check then includes the header).
std::string typed_check_pch(const std::string &cxx, const std::string &inc, const std::string &dir,
                            const std::string &key, const std::string &tmp) {
    std::string pch = dir + "/check-" + key + ".pch";
    if (file_exists(pch)) return pch;
    std::vector<std::string> argv = typed_check_flags(cxx, inc);
    argv.insert(argv.end(), {"-Xclang", "-emit-pch", "-Xclang", "-o", "-Xclang", tmp + ".pch",
                             inc + "/camel_check_msl.h"});
    run(argv, tmp + ".pch.log");
    unlink((tmp + ".pch.log").c_str());
    if (!file_exists(tmp + ".pch") || rename((tmp + ".pch").c_str(), pch.c_str()) != 0) {
        unlink((tmp + ".pch").c_str());
        return "";
    }
    return pch;
}

std::vector<std::string> typed_check_command(const std::string &cxx, const std::string &inc,
                                             const std::string &file, const std::string &pch) {
    std::vector<std::string> argv = typed_check_flags(cxx, inc);
    argv.push_back("-ferror-limit=0");
    if (pch.empty()) argv.insert(argv.end(), {"-include", inc + "/camel_check_msl.h"});
    else argv.insert(argv.end(), {"-Xclang", "-fno-validate-pch", "-include-pch", pch});  // keyed
    argv.push_back(file);                                                                // by content
    return argv;
}

// The strings between single quotes in a line of clang's ('float *', 'f').
static std::vector<std::string> quoted(const std::string &l) {
    std::vector<std::string> q;
    for (size_t i = l.find('\''); i != std::string::npos; i = l.find('\'', i)) {
        size_t e = l.find('\'', i + 1);
        if (e == std::string::npos) break;
        q.push_back(l.substr(i + 1, e - i - 1));
        i = e + 1;
    }
    return q;
}

static bool is_space_word(const std::string &w) {
    return w == "__global" || w == "__constant" || w == "__local" || w == "__private" ||
           w == "__generic";
}

// A type of clang's as words, without its top-level __private (a local variable's
// own space: 'float *__private', '__private float'); `bare` drops every address space
// and cv-qualifier too.
static std::string type_words(const std::string &t, bool bare) {
    std::vector<std::string> w;
    std::string cur;
    for (char c : t + " ") {
        bool word = isalnum((unsigned char)c) || c == '_';
        if (word) {
            cur += c;
            continue;
        }
        if (!cur.empty()) w.push_back(cur);
        cur.clear();
        if (c != ' ') w.push_back(std::string(1, c));
    }
    // an array as the pointer it decays to: 'float[4]' -> 'float *', 'float[4][8]' -> 'float (*)[8]'
    for (size_t i = 0; i + 2 < w.size(); i++)
        if (w[i] == "[" && w[i + 2] == "]") {
            bool more = i + 3 < w.size() && w[i + 3] == "[";
            w.erase(w.begin() + i, w.begin() + i + 3);
            if (more) w.insert(w.begin() + i, {"(", "*", ")"});
            else w.insert(w.begin() + i, "*");
            break;
        }
    bool indirect = false;
    for (auto &x : w) indirect = indirect || x == "*" || x == "&";
    if (!w.empty() && w.back() == "__private" && w.size() > 1 && w[w.size() - 2] == "*") w.pop_back();
    std::string r;
    for (auto &x : w) {
        if (bare && (is_space_word(x) || x == "const" || x == "volatile")) continue;
        if (!bare && !indirect && x == "__private") continue;
        r += x + " ";
    }
    return r;
}

// Does this line of clang's say that two address spaces do not meet? `generic` is set
// when __generic is one of them. Either it names two (cannot pass pointer to address
// space 'A' as a pointer to address space 'B'), or it is about a conversion and two of
// its types are the same but for the space of what they point or refer to. Not a
// redefinition that the header's declarations clash with, nor a ?: of two objects (MSL
// copies them: `c ? tg_struct : device_struct` is a value; of two pointers it is not).
static bool names_two_spaces(const std::string &line, bool header_line, bool &generic) {
    // 'vec4_t *' (aka 'float4 *'): the type itself, not the name it was written with
    std::string l = line;
    for (size_t i = l.find("' (aka '"); i != std::string::npos; i = l.find("' (aka '")) {
        size_t a = l.rfind('\'', i - 1), e = l.find("')", i + 8);
        if (a == std::string::npos || e == std::string::npos) break;
        l = l.substr(0, a + 1) + l.substr(i + 8, e - i - 8) + "'" + l.substr(e + 2);
    }
    std::vector<std::string> spaces;
    for (size_t i = l.find("address space '"); i != std::string::npos;
         i = l.find("address space '", i + 1)) {
        size_t a = i + 15, e = l.find('\'', a);
        if (e != std::string::npos) spaces.push_back(l.substr(a, e - a));
    }
    if (spaces.size() >= 2) {
        for (auto &x : spaces) generic = generic || x == "__generic";
        return true;
    }
    if (header_line) return false;  // the compat header's signatures are not Apple's: their
                                    // deductions (T * from a thread pointer) prove nothing
    static const char *const conversions[] = {
        "cannot initialize", "assigning", "no known conversion from", "cast from",
        "comparison of distinct pointer types", "deduced conflicting types",
        "does not match adjusted type", "cannot bind", "could not bind", "binding reference",
        nullptr};
    bool conversion = false;
    for (const char *const *c = conversions; *c && !conversion; c++)
        conversion = l.find(*c) != std::string::npos;
    bool conditional = l.find("incompatible operand types") != std::string::npos ||
                       l.find("conditional expression is ambiguous") != std::string::npos;
    if (!conversion && !conditional) return false;
    std::vector<std::string> q = quoted(l);
    bool found = false;
    for (size_t i = 0; i + 1 < q.size(); i++) {
        const std::string &a = q[i], &b = q[i + 1];
        std::string wa = type_words(a, false), wb = type_words(b, false);
        if (type_words(a, true) != type_words(b, true) || wa == wb) continue;
        if (conditional && (wa.find('*') == std::string::npos || wb.find('*') == std::string::npos))
            continue;  // two objects: a value of their type, in MSL
        if (a.find("__generic") != std::string::npos || b.find("__generic") != std::string::npos) {
            generic = true;
            continue;
        }
        found = true;
    }
    return found;
}

// clang's spelling of the address spaces as MSL's.
static std::string msl_spaces(std::string s) {
    replace_all(s, " *__private'", " *'");
    replace_all(s, "*__private'", "*'");
    replace_all(s, "&__private'", "&'");  // a reference parameter: 'thread half &'
    replace_all(s, "'__private'", "'thread'");
    replace_all(s, "__private ", "thread ");
    replace_all(s, "__global", "device");
    replace_all(s, "__constant", "constant");
    replace_all(s, "__local", "threadgroup");
    replace_all(s, "__generic", "generic");
    replace_all(s, "__camel_half", "half");
    replace_all(s, "__camel_kw_", "");
    replace_all(s, "__camel_atomic_", "atomic_");
    replace_all(s, "_Float16", "half");
    // 'thread half[64]' (aka 'thread half[64]'), once half is spelled half: one is enough
    for (size_t i = s.find("' (aka '"); i != std::string::npos; i = s.find("' (aka '", i + 1)) {
        size_t a = s.rfind('\'', i - 1), e = s.find("')", i + 8);
        if (a == std::string::npos || e == std::string::npos) break;
        if (s.compare(a + 1, i - a - 1, s, i + 8, e - i - 8) == 0) s.erase(i + 1, e + 2 - i - 1);
    }
    return s;
}

// The check's errors that are address-space mismatches in the user's code, as MSL
// spells them ("" for none). `inc`: the compat headers' directory (not user code).
// The kind of a diagnostic line of clang's, "file:12:5: error: ..." -> "error" (or
// "fatal error", "warning", "note"), its file in `file`; "" for any other line (a
// source snippet, "In file included from ...", "3 errors generated.").
static std::string diag_kind(const std::string &l, std::string &file) {
    if (l.empty() || l[0] == ' ') return "";
    for (size_t i = l.find(':'); i != std::string::npos; i = l.find(':', i + 1)) {
        size_t j = i + 1;
        while (j < l.size() && isdigit((unsigned char)l[j])) j++;
        if (j == i + 1 || j >= l.size() || l[j] != ':') continue;
        size_t k = j + 1;
        while (k < l.size() && isdigit((unsigned char)l[k])) k++;
        if (k == j + 1 || l.compare(k, 2, ": ") != 0) continue;
        size_t e = l.find(": ", k + 2);
        if (e == std::string::npos) return "";
        file = l.substr(0, i);
        return l.substr(k + 2, e - k - 2);
    }
    return "";
}

std::string typed_check_errors(const std::string &log, const std::string &inc, const std::string &display) {
    struct Group {
        std::string text;
        bool user = false, keep = false, generic = false, apple_decl = false, second_result = false;
    };
    std::vector<Group> groups;
    bool in_error = false;
    for (size_t i = 0; i < log.size();) {
        size_t e = log.find('\n', i);
        if (e == std::string::npos) e = log.size();
        std::string l = log.substr(i, e - i);
        i = e + 1;
        std::string file, kind = diag_kind(l, file);
        bool header = file.compare(0, inc.size(), inc) == 0 || (!file.empty() && file[0] == '<');
        if (kind == "error" || kind == "fatal error") {
            groups.push_back(Group());
            groups.back().user = !header;
            // the header declares these as Apple does, one per space: its notes count
            groups.back().apple_decl =
                l.find("no matching function for call to 'simdgroup_load'") != std::string::npos ||
                l.find("no matching function for call to 'simdgroup_store'") != std::string::npos;
            groups.back().second_result =
                l.find("no matching function for call to 'sincos'") != std::string::npos ||
                l.find("no matching function for call to 'modf'") != std::string::npos ||
                l.find("no matching function for call to 'frexp'") != std::string::npos;
            in_error = true;
        } else if (kind == "note") {
            if (!in_error) continue;
        } else if (!kind.empty() || l.empty() || l[0] != ' ') {
            in_error = false;  // a warning, or a line that is no part of a diagnostic
            continue;
        } else if (!in_error) {
            continue;  // a snippet of something not kept
        }
        Group &g = groups.back();
        g.text += l + "\n";
        if (!kind.empty()) g.keep = names_two_spaces(l, header && !g.apple_decl, g.generic) || g.keep;
    }
    std::string kept, audit;
    for (auto &g : groups) {
        if (!g.user) continue;
        bool report = g.keep && !g.generic;
        audit += std::string(report ? "REPORTED " : "IGNORED ") + g.text;
        if (report) kept += g.text;
        if (report && g.apple_decl)  // Apple's rule, which the notes do not say
            kept += "MSL 6.7 (Table 6.9): simdgroup_load reads and simdgroup_store writes device or "
                    "threadgroup memory, never constant or thread memory: copy the data into "
                    "threadgroup memory first\n";
        if (report && g.second_result)
            kept += "MSL 6.5 (Table 6.4): cosval, intval and exponent are thread references "
                    "(sincos, modf and frexp write their second result through a reference whose "
                    "address space is unwritten, so thread before MSL 4.1), never device, constant "
                    "or threadgroup memory: pass a local variable, then store it\n";
    }
    const char *audit_file = getenv("CAMEL_SIM_TYPED_CHECK_LOG");
    if (audit_file && *audit_file && !audit.empty()) {
        FILE *f = fopen(audit_file, "a");
        if (f) {
            fprintf(f, "==== %s\n%s", display.c_str(), audit.c_str());
            fclose(f);
        }
    }
    return msl_spaces(kept);
}
}  // namespace camel_sim

extern "C" int camel_sim_compile(const char *source, const char *path, char **so_path, char **log) {
    return camel_sim::compile_library(source, path, nullptr, so_path, log);
}

int camel_sim::compile_library(const char *source, const char *path, const Specialisation *spec,
                               char **so_path, char **log) {
    using namespace camel_sim;
    *so_path = nullptr;
    *log = nullptr;
    std::string err;
    std::string src = source ? source : "";
    std::string display = path && *path ? path : "program_source";

    std::string cxx = find_compiler(err);
    if (cxx.empty()) {
        *log = dup_string(err);
        return 1;
    }
    std::string inc = find_include_dir(err);
    if (inc.empty()) {
        *log = dup_string(err);
        return 1;
    }
    std::string sanitize;
    if (!sanitize_flags(sanitize, err)) {
        *log = dup_string(err);
        return 1;
    }
    const char *typed_env = getenv("CAMEL_SIM_TYPED_CHECK");
    bool typed = !(typed_env && strcmp(typed_env, "0") == 0);

    // ---- 1. the cache key ----------------------------------------------
    Hasher h;
    h.add(std::string(kTranslatorVersion));
    h.add(src);
    h.add(display);
    h.add(sanitize);
    h.add(std::string(typed ? "typed-check" : "no-typed-check"));
    char real[4096];
    std::string cxx_real = realpath(cxx.c_str(), real) ? real : cxx;
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
    hash_headers(h, inc);
    std::string include_env;
    std::vector<std::string> dirs = include_dirs(path, include_env);
    for (const std::string &d : dirs) h.add(d);  // where a header is found is part of the key
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
    std::vector<std::string> headers;
    recorded_headers(dir, key, headers);
    std::string so = dir + "/" + key_with_headers(key, headers) + ".so";
    if (file_exists(so)) {
        if (verbose()) fprintf(stderr, "[sim] cache hit %s -> %s\n", display.c_str(), so.c_str());
        *so_path = dup_string(so);
        return 0;
    }
    // a miss: compile under the entry's lock; whoever held it may have just made the entry
    CacheLock lock(dir + "/" + key + ".lock");
    recorded_headers(dir, key, headers);
    so = dir + "/" + key_with_headers(key, headers) + ".so";
    if (file_exists(so)) {
        if (verbose()) fprintf(stderr, "[sim] cache hit %s -> %s\n", display.c_str(), so.c_str());
        *so_path = dup_string(so);
        return 0;
    }

    // ---- 2. portability guard on the raw source ---------------------------
    if (!camel_sim::check_includes(src, display, err, dirs)) {
        *log = dup_string(err);
        return 1;
    }

    if (verbose()) fprintf(stderr, "[sim] compiling %s -> %s\n", display.c_str(), so.c_str());
    std::string tmp = dir + "/" + key + ".tmp." + std::to_string(getpid()) + "." +
                      std::to_string(g_counter++);
    std::string src_file = tmp + ".metal", pre_file = tmp + ".pre", log_file = tmp + ".log";
    std::string cpp_file = tmp + ".ii", so_tmp = tmp + ".so", dep_file = tmp + ".d";
    std::string check_file = tmp + ".check.ii", check_log = tmp + ".check.log";
    pid_t check_pid = -1;
    auto cleanup = [&]() {
        if (check_pid >= 0) kill(check_pid, SIGKILL);  // a check the compile's failure made moot:
        finish(check_pid);                               // stopped, and waited for
        check_pid = -1;
        unlink(check_file.c_str());
        unlink(check_log.c_str());
        unlink(src_file.c_str());
        unlink(pre_file.c_str());
        unlink(dep_file.c_str());
        unlink(log_file.c_str());
        unlink(cpp_file.c_str());
        unlink(so_tmp.c_str());
    };
    auto fail = [&](const std::string &msg) {
        *log = dup_string(msg);
        cleanup();
        return 1;
    };
    if (!write_file(src_file, src)) return fail("[sim] cannot write " + src_file + ": " + strerror(errno));

    // ---- 3. preprocess ------------------------------------------------------
    std::vector<std::string> pre = {cxx, "-E", "-x", "c++", "-std=c++17", "-isystem", inc,
                                    "-D__METAL_VERSION__=310", "-D__METAL_SIM__=1"};
    for (const std::string &d : dirs) pre.push_back("-I" + d);  // the file's directory, CAMEL_INCLUDE_PATH
    pre.insert(pre.end(), {"-MMD", "-MF", dep_file, src_file, "-o", pre_file});  // -MMD: the headers read
    int rc = run(pre, log_file);
    std::string clang_log;
    read_file(log_file, clang_log);
    replace_all(clang_log, src_file, display);
    if (rc != 0) return fail(clang_log.empty() ? "[sim] could not run " + cxx : clang_log);
    headers = read_deps(dep_file, src_file);
    std::string lib_key = key_with_headers(key, headers);
    so = dir + "/" + lib_key + ".so";

    // ---- 4. rewrite ---------------------------------------------------------
    std::string preprocessed, cpp;
    if (!read_file(pre_file, preprocessed)) return fail("[sim] cannot read " + pre_file);
    if (!camel_sim::check_system_headers(preprocessed, inc, display, src_file, err)) return fail(err);
    std::vector<FunctionConstant> constants;
    if (!specialize_function_constants(preprocessed, src_file, display, spec ? &spec->values : nullptr,
                                       constants, err))
        return fail(err);
    std::string unused_desc;
    if (!camel_sim::rewrite_msl_for(TARGET_SIM, preprocessed, src_file, display, cpp, err, unused_desc,
                                    spec ? spec->kernel : std::string()))
        return fail(err);
    if (!constants.empty()) {  // the runtime's list (camel_library_function_constants)
        std::string lines = function_constant_lines(constants);
        replace_all(lines, "\n", "\\n");
        cpp += "\nextern \"C\" __attribute__((visibility(\"default\"))) const char "
               "camel_sim_function_constants[] = \"" + lines + "\";\n";
    }
    if (!write_file(cpp_file, cpp)) return fail("[sim] cannot write " + cpp_file);

    // ---- 4b. the typed address-space check, started beside the compile ------
    // (not for a specialisation: the library compile checked the same code)
    if (typed && !spec) {
        Hasher hp;  // the key of the check's precompiled header: the compiler and the headers
        hp.add(std::string("typed-check-pch 1"));
        hp.add(cxx_real);
        hp.add(inc);  // the PCH names the headers by path: one built from another copy fails
                      // to load, a fatal error that is no mismatch (the check saw nothing)
        if (stat(cxx_real.c_str(), &st) == 0) {
            hp.add(&st.st_size, sizeof st.st_size);
            hp.add(&st.st_mtime, sizeof st.st_mtime);
        }
        hash_headers(hp, inc);
        std::string pch_key = hp.hex(), check_src, unused;
        if (camel_sim::rewrite_msl_for(TARGET_CHECK, preprocessed, src_file, display, check_src, err,
                                       unused) &&
            write_file(check_file, check_src))
            check_pid = start(typed_check_command(cxx, inc, check_file,
                                                  typed_check_pch(cxx, inc, dir, pch_key, tmp)),
                              check_log);
    }

    // ---- 5. compile -----------------------------------------------------------
    // No C++ runtime is needed: no exceptions, RTTI, static-init guards or libstdc++.
    std::vector<std::string> cc = {cxx, "-x", "c++-cpp-output", "-std=c++17", "-O2", "-fPIC",
                                   "-shared", "-fno-exceptions", "-fno-rtti",
                                   "-fno-threadsafe-statics", "-fvisibility=hidden",
                                   "-fno-math-errno", "-ffp-contract=on", "-nostdlib++",
                                   "-Wno-unused-value", "-Wno-unknown-pragmas", "-ferror-limit=20",
                                   "-Werror=vla"};  // MSL has no variable-length arrays
    if (half_rounding_flag(cxx, log_file))
        cc.insert(cc.end(), {"-Xclang", "-ffloat16-excess-precision=none", "-Xclang",
                             "-fbfloat16-excess-precision=none"});  // bfloat likewise
    if (!sanitize.empty()) {
        // Line tables are all a report needs (file:line:column of each frame, inlined ones
        // too); full -g adds variable locations nothing reads, and took an ASan build of
        // shaders/ops_attention.metal from 10 s to 17 s of clang
        cc.insert(cc.end(), {"-fsanitize=" + sanitize, "-fno-omit-frame-pointer",
                             "-gline-tables-only", "-shared-libsan"});
        // One thread's access at a time, as the kernel wrote it: a vectorised group entry
        // would report "WRITE of size 16" for four threads' floats.
        cc.insert(cc.end(), {"-fno-vectorize", "-fno-slp-vectorize"});
        // -shared-libsan makes the library need libclang_rt.<san>-<arch>.so;
        // record where clang keeps it so dlopen finds it (RUNPATH)
#if defined(__x86_64__)
        const std::string arch = "x86_64";
#else
        const std::string arch = "aarch64";
#endif
        std::string san = sanitize.find("address") != std::string::npos ? "asan" : "ubsan_standalone";
        std::string rt;
        std::vector<std::string> q = {cxx, "-print-file-name=libclang_rt." + san + "-" + arch + ".so"};
        if (run(q, log_file) == 0 && read_file(log_file, rt)) {
            while (!rt.empty() && (rt.back() == '\n' || rt.back() == '\r')) rt.pop_back();
            if (rt.find('/') != std::string::npos) cc.push_back("-Wl,-rpath," + dirname_of(rt));
        }
    }
    if (spec)  // the other kernels' code goes, with the undefined constants only it uses
        cc.insert(cc.end(), {"-ffunction-sections", "-fdata-sections", "-Wl,--gc-sections"});
    cc.insert(cc.end(), {cpp_file, "-o", so_tmp, "-lm"});
    rc = run(cc, log_file);
    read_file(log_file, clang_log);
    replace_all(clang_log, cpp_file, display);
    clang_log = tidy_log(clang_log, display, src, inc);
    // -Werror=vla: clang 18+ names the C++ extension, older clangs the array
    for (const char *vla : {"variable length arrays in C++ are a Clang extension [-Werror,-Wvla-cxx-extension]",
                            "variable length arrays are a C99 feature [-Werror,-Wvla-extension]",
                            "variable length array used [-Werror,-Wvla]"})
        replace_all(clang_log, vla,
                    "variable length array: Metal does not support them, an array size must be "
                    "a constant expression (use a fixed size, or threadgroup memory sized by the host)");
    if (rc != 0)
        return fail("[sim] compiling " + display + " failed:\n" +
                    (clang_log.empty() ? "could not run " + cxx : clang_log));
    if (check_pid >= 0) {
        int check_rc = finish(check_pid);
        check_pid = -1;
        std::string check_out;
        if (check_rc != 0 && read_file(check_log, check_out)) {
            replace_all(check_out, src_file, display);
            std::string mismatches = typed_check_errors(check_out, inc, display);
            if (!mismatches.empty())
                return fail("[sim] " + display + ": a pointer or reference changes address space "
                            "(MSL 4: device, constant, threadgroup and thread memory do not convert "
                            "into one another; the simulator's typed check):\n" +
                            tidy_log(mismatches, display, src, inc));
        }
    }

    // keep the translated C++ next to the library, for the curious
    rename(cpp_file.c_str(), (dir + "/" + lib_key + ".cpp").c_str());
    if (rename(so_tmp.c_str(), so.c_str()) != 0)
        return fail("[sim] cannot rename " + so_tmp + " to " + so + ": " + strerror(errno));
    record_headers(dir, key, headers, tmp + ".deps");  // after the library: a reader finds both
    cleanup();
    *so_path = dup_string(so);
    return 0;
}

// ---- function constants ------------------------------------------------------------
// A small scan of the preprocessed text (comments are gone; strings and character
// literals are skipped; line markers give the file and line for messages).

namespace camel_sim {
namespace {

struct FcTok {
    enum Kind { IDENT, PUNCT, OTHER } kind;
    size_t start, end;
    int line;
    std::string file;
    bool system;  // in a system header (line marker flag 3): the compat headers
};

std::vector<FcTok> fc_scan(const std::string &s) {
    std::vector<FcTok> out;
    size_t i = 0, n = s.size();
    int line = 1;
    std::string file;
    bool line_start = true, system = false;
    while (i < n) {
        char c = s[i];
        if (c == '\n') {
            line++;
            line_start = true;
            i++;
            continue;
        }
        if (c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v') {
            i++;
            continue;
        }
        if (line_start && c == '#') {  // # 12 "file.metal" 1   (or #pragma ...)
            size_t e = s.find('\n', i);
            if (e == std::string::npos) e = n;
            std::string d = s.substr(i, e - i);
            size_t p = d.find_first_not_of(" \t#");
            if (p != std::string::npos && isdigit((unsigned char)d[p])) {
                int num = atoi(d.c_str() + p);
                size_t q1 = d.find('"'), q2 = d.rfind('"');
                if (q1 != std::string::npos && q2 > q1) {
                    file = d.substr(q1 + 1, q2 - q1 - 1);
                    system = (" " + d.substr(q2 + 1) + " ").find(" 3 ") != std::string::npos;
                }
                line = num - 1;  // the newline ending the marker makes it num
            }
            i = e;
            continue;
        }
        line_start = false;
        size_t b = i;
        if (isalpha((unsigned char)c) || c == '_') {
            while (i < n && (isalnum((unsigned char)s[i]) || s[i] == '_')) i++;
            out.push_back({FcTok::IDENT, b, i, line, file, system});
        } else if (isdigit((unsigned char)c) || (c == '.' && i + 1 < n && isdigit((unsigned char)s[i + 1]))) {
            while (i < n && (isalnum((unsigned char)s[i]) || s[i] == '_' || s[i] == '.' || s[i] == '\'' ||
                             ((s[i] == '+' || s[i] == '-') && strchr("eEpP", s[i - 1]))))
                i++;
            out.push_back({FcTok::OTHER, b, i, line, file, system});
        } else if (c == '"' || c == '\'') {
            i++;
            while (i < n && s[i] != c && s[i] != '\n') i += s[i] == '\\' ? 2 : 1;
            if (i < n && s[i] == c) i++;
            out.push_back({FcTok::OTHER, b, i, line, file, system});
        } else {
            i++;
            out.push_back({FcTok::PUNCT, b, i, line, file, system});
        }
    }
    return out;
}

// MSL type name -> (camel_constant_type, components); false if not a function-constant type
bool fc_type(const std::string &t, uint32_t &code, uint32_t &components) {
    static const char *const bases[] = {nullptr, "bool", "char", "uchar", "short", "ushort",
                                        "int",   "uint", "half", "float"};
    for (uint32_t k = 1; k <= 9; k++) {
        std::string b = bases[k];
        if (t == b) {
            code = k;
            components = 1;
            return true;
        }
        if (k != 1 && t.size() == b.size() + 1 && t.compare(0, b.size(), b) == 0 &&
            t.back() >= '2' && t.back() <= '4') {
            code = k;
            components = (uint32_t)(t.back() - '0');
            return true;
        }
    }
    return false;
}

bool fc_scalar(const std::string &t) {
    uint32_t code, n;
    return fc_type(t, code, n) && n == 1;
}

// Is the value of a constant_literal ("true", "int(3)", "half(0x1p+0)", "NAN") nonzero?
bool literal_nonzero(const std::string &v) {
    if (v == "true") return true;
    if (v == "false") return false;
    size_t p = v.find('(');
    std::string num = p == std::string::npos ? v : v.substr(p + 1);
    if (num.find("NAN") != std::string::npos || num.find("INFINITY") != std::string::npos) return true;
    return strtod(num.c_str(), nullptr) != 0.0;
}

std::string fc_scalar_name(uint32_t code) {
    static const char *const bases[] = {"?", "bool", "char", "uchar", "short", "ushort",
                                        "int", "uint", "half", "float"};
    return code >= 1 && code <= 9 ? bases[code] : "?";
}

float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0) {
        f = (float)man * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
        return sign ? -f : f;
    }
    uint32_t bits = exp == 31 ? sign | 0x7f800000u | (man << 13)
                              : sign | ((exp - 15 + 127) << 23) | (man << 13);
    memcpy(&f, &bits, 4);
    return f;
}

std::string float_expr(float f) {
    if (f != f) return "NAN";
    if (f == __builtin_inff()) return "INFINITY";
    if (f == -__builtin_inff()) return "(-INFINITY)";
    char buf[64];
    snprintf(buf, sizeof buf, "%af", (double)f);
    return buf;
}

}  // namespace

std::string constant_literal(const std::string &type, uint32_t code, uint32_t components,
                             const uint8_t *bytes, std::string &err) {
    uint32_t want_code = 0, want_n = 0;
    if (!fc_type(type, want_code, want_n)) {
        err = "type '" + type + "' is not a function-constant type";
        return "";
    }
    if (code != want_code || components != want_n) {
        std::string given = fc_scalar_name(code) + (components > 1 ? std::to_string(components) : "");
        if (code < 1 || code > 9 || components < 1 || components > 4)
            given = "(type " + std::to_string(code) + ", " + std::to_string(components) + " components)";
        err = "the value given is " + given + ", the constant is " + type;
        return "";
    }
    static const int size[] = {0, 1, 1, 1, 2, 2, 4, 4, 2, 4};
    std::string elems;
    for (uint32_t k = 0; k < components; k++) {
        const uint8_t *p = bytes + k * size[code];
        std::string e;
        int16_t i16;
        uint16_t u16;
        int32_t i32;
        uint32_t u32;
        float f;
        switch (code) {
        case 1: e = p[0] ? "true" : "false"; break;
        case 2: e = "char(" + std::to_string((int)(int8_t)p[0]) + ")"; break;
        case 3: e = "uchar(" + std::to_string((unsigned)p[0]) + "u)"; break;
        case 4: memcpy(&i16, p, 2); e = "short(" + std::to_string(i16) + ")"; break;
        case 5: memcpy(&u16, p, 2); e = "ushort(" + std::to_string(u16) + "u)"; break;
        case 6:
            memcpy(&i32, p, 4);
            e = i32 == INT32_MIN ? "int(-2147483647 - 1)" : "int(" + std::to_string(i32) + ")";
            break;
        case 7: memcpy(&u32, p, 4); e = "uint(" + std::to_string(u32) + "u)"; break;
        case 8: memcpy(&u16, p, 2); e = "half(" + float_expr(half_to_float(u16)) + ")"; break;
        default: memcpy(&f, p, 4); e = float_expr(f); break;
        }
        elems += (k ? ", " : "") + e;
    }
    return components == 1 ? elems : type + "(" + elems + ")";  // elements are typed
}

std::string function_constant_lines(const std::vector<FunctionConstant> &found) {
    std::string s;
    for (const FunctionConstant &c : found) s += std::to_string(c.index) + " " + c.type + " " + c.name + "\n";
    return s;
}

int missing_constant(const std::string &text) {
    size_t p = text.find("camel_fc_missing_");
    if (p == std::string::npos) return -1;
    p += strlen("camel_fc_missing_");
    if (p >= text.size() || !isdigit((unsigned char)text[p])) return -1;
    return atoi(text.c_str() + p);
}

bool specialize_function_constants(std::string &s, const std::string &main_file,
                                   const std::string &display,
                                   const std::vector<std::pair<int, std::string>> *values,
                                   std::vector<FunctionConstant> &found, std::string &err,
                                   const char *prefix) {
    found.clear();
    if (s.find("function_constant") == std::string::npos) return true;  // also is_..._defined
    std::vector<FcTok> t = fc_scan(s);
    auto text = [&](size_t k) { return s.substr(t[k].start, t[k].end - t[k].start); };
    auto punct = [&](size_t k, char c) { return k < t.size() && t[k].kind == FcTok::PUNCT && s[t[k].start] == c; };
    auto where = [&](size_t k) {
        return (t[k].file == main_file || t[k].file.empty() ? display : t[k].file) + ":" +
               std::to_string(t[k].line) + ": ";
    };
    const char *form = "write `constant T name [[function_constant(index)]];` at program scope, "
                       "index an integer literal";
    // function_constant(name) inside [[...]]: an optional argument or member (MSL 5.8.1.2,
    // 5.8.1.6), whose name refers to a function constant; the declaration form has an index
    auto optional_form = [&](size_t k) {
        if (!(punct(k + 1, '(') && k + 3 < t.size() && t[k + 2].kind == FcTok::IDENT &&
              text(k + 2) != "true" && text(k + 2) != "false" && punct(k + 3, ')')))
            return false;
        // `constant T a [[function_constant(N)]];` declares a constant (with an index that is
        // no literal, an error below); a parameter or member is not in the constant space
        if (!(k >= 4 && punct(k - 1, '[') && punct(k - 2, '[') && punct(k + 4, ']') &&
              punct(k + 5, ']') && punct(k + 6, ';')))
            return true;
        for (size_t c = k - 4; c > 0 && k - c < 8; c--) {
            if (t[c - 1].kind != FcTok::IDENT) return true;
            if (text(c - 1) == "constant") return false;
        }
        return true;
    };
    struct Decl {
        size_t first, last;  // tokens: `constant` .. `;`
        FunctionConstant fc;
        std::string value;   // "" when none
        bool defined;
    };
    std::vector<Decl> decls;
    bool ok = true;
    for (size_t k = 0; k < t.size(); k++) {
        if (t[k].kind != FcTok::IDENT || t[k].system || text(k) != "function_constant") continue;
        if (optional_form(k)) continue;  // [[buffer(1), function_constant(has_b)]]: below
        if (!(k >= 2 && punct(k - 1, '[') && punct(k - 2, '['))) {
            err += prefix + where(k) + "error: function_constant(...) on a parameter or struct "
                   "member takes the name of a function constant (MSL 5.8.1.2: "
                   "[[buffer(1), function_constant(has_b)]]), not an index\n";
            ok = false;
            continue;
        }
        size_t name_k = k - 3;
        if (!(k >= 4 && t[name_k].kind == FcTok::IDENT && punct(k + 1, '(') && k + 6 < t.size() &&
              t[k + 2].kind == FcTok::OTHER && isdigit((unsigned char)s[t[k + 2].start]) &&
              punct(k + 3, ')') && punct(k + 4, ']') && punct(k + 5, ']') && punct(k + 6, ';'))) {
            err += prefix + where(k) + "error: this function constant's form is not supported: " + form + "\n";
            ok = false;
            continue;
        }
        size_t c = name_k;  // back to `constant`
        std::string type;
        while (c > 0 && !(t[c - 1].kind == FcTok::IDENT && text(c - 1) == "constant")) {
            c--;
            if (t[c].kind != FcTok::IDENT || name_k - c > 3) break;
            if (text(c) != "const") type = text(c) + (type.empty() ? "" : " " + type);
        }
        if (c == 0 || !(t[c - 1].kind == FcTok::IDENT && text(c - 1) == "constant")) {
            err += prefix + where(k) + "error: a function constant is declared in the constant "
                   "address space: " + form + "\n";
            ok = false;
            continue;
        }
        if (type == "unsigned int" || type == "unsigned") type = "uint";
        if (type == "unsigned short") type = "ushort";
        if (type == "unsigned char") type = "uchar";
        uint32_t code, n;
        if (!fc_type(type, code, n)) {
            err += prefix + where(k) + "error: function constant '" + text(name_k) + "' has type '" +
                   type + "'; supported: bool, char, uchar, short, ushort, int, uint, half, float "
                   "and their 2-4 vectors (not bool)\n";
            ok = false;
            continue;
        }
        std::string idx_text = text(k + 2);
        char *endp = nullptr;
        long idx = strtol(idx_text.c_str(), &endp, 0);
        while (endp && (*endp == 'u' || *endp == 'U')) endp++;
        if (!endp || *endp || idx < 0 || idx > 65535) {
            err += prefix + where(k) + "error: function constant index '" + idx_text +
                   "' is not an integer 0..65535\n";
            ok = false;
            continue;
        }
        Decl d{c - 1, k + 6, {(int)idx, type, text(name_k), t[k].line}, "", false};
        for (const Decl &o : decls)
            if (o.fc.index == d.fc.index) {
                err += prefix + where(k) + "error: function constants '" + o.fc.name + "' and '" +
                       d.fc.name + "' both have index " + std::to_string(idx) + "\n";
                ok = false;
            }
        if (values)
            for (auto &v : *values)
                if (v.first == d.fc.index) {
                    d.value = v.second;
                    d.defined = true;
                }
        decls.push_back(d);
    }
    if (!ok) return false;
    for (const Decl &d : decls) found.push_back(d.fc);

    // What an optional argument's name refers to: a function constant declared above
    // (its value, nonzero or true), or a program-scope constant set to
    // is_function_constant_defined(f) (the specification's own example: 5.8.1.2).
    // 1 present, 0 absent, -1 with `why` for a name the simulator cannot evaluate.
    std::map<std::string, std::pair<std::string, size_t>> derived;  // name -> (f, its token)
    for (size_t k = 0; k + 7 < t.size(); k++)
        if (t[k].kind == FcTok::IDENT && !t[k].system && punct(k + 1, '=') &&
            text(k + 2) == "is_function_constant_defined" && punct(k + 3, '(') &&
            t[k + 4].kind == FcTok::IDENT && punct(k + 5, ')') && punct(k + 6, ';') && k >= 2 &&
            (text(k - 2) == "constant" || (k >= 3 && text(k - 3) == "constant")))
            derived[text(k)] = {text(k + 4), k};
    auto optional_presence = [&](const std::string &name, size_t k, bool specialising,
                                 std::string &why) -> int {
        for (const Decl &d : decls) {
            if (d.fc.name != name) continue;
            if (d.fc.type != "bool" && !fc_scalar(d.fc.type)) {
                why = "'" + name + "' is a " + d.fc.type + "; an optional argument's function "
                      "constant is a scalar (MSL 5.8.1.2: present when nonzero or true)";
                return -1;
            }
            if (d.first > k) break;  // declared after its use
            if (specialising && d.defined && literal_nonzero(d.value)) return 1;
            why = !specialising || !d.defined ? "unset" : d.fc.type == "bool" ? "false" : "zero";
            return 0;
        }
        auto it = derived.find(name);
        if (it != derived.end() && it->second.second < k) {
            for (const Decl &d : decls)
                if (d.fc.name == it->second.first) {
                    why = "false";  // is_function_constant_defined(d): d has no value
                    return specialising && d.defined ? 1 : 0;
                }
            why = "'" + it->second.first + "' is not a function constant declared above";
            return -1;
        }
        why = "'" + name + "' is not a function constant declared above; the simulator and the "
              "CUDA shim evaluate the name of a function constant ([[function_constant(index)]]) "
              "or of a constant set to is_function_constant_defined(name) (MSL 5.8.1.2)";
        return -1;
    };

    std::string out;
    out.reserve(s.size() + 256);
    size_t copied = 0;  // s[0, copied) is in out
    auto replace = [&](size_t from, size_t to, const std::string &with) {
        out.append(s, copied, from - copied);
        out += with;
        for (size_t i = from; i < to; i++)
            if (s[i] == '\n') out += '\n';  // keep the line numbers
        copied = to;
    };
    size_t next_decl = 0;
    for (size_t k = 0; k < t.size(); k++) {
        if (next_decl < decls.size() && k == decls[next_decl].first) {
            const Decl &d = decls[next_decl++];
            std::string with;
            if (!values)
                with = "constant " + d.fc.type + " " + d.fc.name + " = " + d.fc.type + "(0);";
            else if (d.defined)
                with = "constant " + d.fc.type + " " + d.fc.name + " = " + d.value + ";";
            else  // no value: a use that stays in the code leaves this undefined symbol
                with = d.fc.type + " camel_fc_missing_" + std::to_string(d.fc.index) + "_();";
            replace(t[d.first].start, t[d.last].end, with);
            k = d.last;
            continue;
        }
        if (t[k].kind != FcTok::IDENT || t[k].system) continue;  // the user's code only
        std::string id = text(k);
        if (id == "function_constant" && optional_form(k)) {
            // MSL 5.8.1.2: nonzero or true: the argument is declared; 0, false or no value
            // (as if is_function_constant_defined(name) were false): it is not. The
            // rewriter reads the outcome, function_constant(true) or (false).
            std::string name = text(k + 2), why;
            int present = optional_presence(name, k, values != nullptr, why);
            if (present < 0) {
                err += prefix + where(k) + "error: function_constant(" + name + "): " + why + "\n";
                ok = false;
                continue;
            }
            // (false, name, why): the runtime's message says why the argument is left out
            replace(t[k].start, t[k + 3].end,
                    present ? "function_constant(true)"
                            : "function_constant(false, " + name + ", " + why + ")");
            k += 3;
            continue;
        }
        if (id == "is_function_constant_defined") {
            const Decl *d = nullptr;
            if (punct(k + 1, '(') && k + 3 < t.size() && t[k + 2].kind == FcTok::IDENT && punct(k + 3, ')'))
                for (size_t j = 0; j < next_decl; j++)
                    if (decls[j].fc.name == text(k + 2)) d = &decls[j];
            if (!d) {
                err += prefix + where(k) + "error: is_function_constant_defined(name) takes the name "
                       "of a function constant declared above ([[function_constant(index)]])\n";
                ok = false;
                continue;
            }
            replace(t[k].start, t[k + 3].end, values && d->defined ? "true" : "false");
            k += 3;
            continue;
        }
        if (!values) continue;
        for (size_t j = 0; j < next_decl; j++) {
            const Decl &d = decls[j];
            if (d.defined || d.fc.name != id) continue;
            // a member (.x, ->x) or a qualified name (ns::x) is another name
            if (k > 0 && (punct(k - 1, '.') || (punct(k - 1, '>') && punct(k - 2, '-')) ||
                          (punct(k - 1, ':') && punct(k - 2, ':'))))
                break;
            replace(t[k].start, t[k].end, "camel_fc_missing_" + std::to_string(d.fc.index) + "_()");
            break;
        }
    }
    if (!ok) return false;
    out.append(s, copied, std::string::npos);
    s.swap(out);
    return true;
}

}  // namespace camel_sim
