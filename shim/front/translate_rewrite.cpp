// translate_rewrite.cpp — MSL to C++, one token at a time.
//
// Input: the .metal source after `clang -E` (macros expanded, #includes
// inlined, line markers `# 12 "file"` telling where each line came from).
// Output: C++ that compiles against include/camel_sim_msl.h, plus generated
// code at the end: one entry wrapper per kernel and the library description
// the runtime reads (see sim_abi.h).
//
// Only tokens of the user's files are rewritten; the compat headers (system
// headers, flag 3 in the line markers) pass through. Newlines are never added
// or removed inside user code, so every token stays on its .metal line and
// clang's errors point at the right place.
//
// What changes (see docs/simulator.md, "How a .metal file becomes a shared
// object"):
//   device, thread                 dropped (one address space on a CPU)
//   constant                       const (namespace scope: static const)
//   threadgroup T x[N];            in a function body: auto &x = *__camel_tg<T[N]>();
//   other threadgroup              dropped (pointer and parameter qualifiers)
//   kernel, [[attributes]]         dropped, after the kernel signature is recorded
//   1.5 / 1.5h                     1.5f / 1.5f16 (MSL has no double)
//   float4(a, b.xy)                __camel_make<float4>(a, b.xy)
//   static_cast<float4>(i)         __camel_make<float4>(i)
//   (float4)i                      __camel_conv<float4>() ->* i   (converts, like MSL)
//   vec4_t(a, b), (vec4_t)i        the same for typedefs of vector types
//   T(a, b), (T)v                  __camel_construct<T>(a, b), __camel_cast<T>() ->* v
//                                  (T a template type parameter)
//   f({a, b})                      f(__camel_list(a, b))  (a braced vector argument)
//   address-space overloads        a second definition that erases to the same code dropped
//
// The CUDA shim (shim/cuda/translate_cuda.cpp) uses the same rewrite with
// TARGET_CUDA; there a function-scope `threadgroup T x[N];` becomes
// `__shared__ T x[N];` and the generated code is one __global__ entry wrapper
// per kernel (see shim/cuda/cuda_abi.h) instead of the library description.
// TARGET_CHECK is the input of the typed address-space check (translate.cpp): the
// user's tokens only, device, thread and threadgroup kept, constant as `const constant`,
// no entry wrappers and no merged address-space overloads; `thread` written where MSL
// before 4.1 means it without a word (implicit_thread).
#include "translate_internal.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "sim_abi.h"

namespace camel_sim {
namespace {

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------
enum Kind { IDENT, NUMBER, STRING, PUNCT, SPACE, NEWLINE, DIRECTIVE };

struct Token {
    Kind kind;
    std::string text;  // as in the input
    std::string out;   // what to write (starts equal to text)
    int line;          // line in its file
    bool user;         // from a user file (rewritten), not a compat header
};

bool is_ident_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '$'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_ident_char(char c) { return is_ident_start(c) || is_digit(c); }

// Three-character and two-character punctuators (longest match first).
const char *const kPunct3[] = {"<<=", ">>=", "...", "->*", nullptr};
const char *const kPunct2[] = {"::", "->", "++", "--", "<<", ">>", "<=", ">=", "==", "!=", "&&",
                               "||", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", ".*", "##",
                               nullptr};

struct Lexer {
    const std::string &s;
    const std::string &main_file;
    const std::string &display;
    std::vector<Token> toks;
    int line = 1;
    bool user = false;

    Lexer(const std::string &src, const std::string &mf, const std::string &disp)
        : s(src), main_file(mf), display(disp) {}

    void push(Kind k, size_t a, size_t b) {
        Token t{k, s.substr(a, b - a), s.substr(a, b - a), line, user};
        toks.push_back(t);
    }

    // A line marker: # 12 "file" flags. Sets the line and whether what
    // follows is user code; the main file's name is replaced by `display`.
    void directive(size_t a, size_t b) {
        std::string d = s.substr(a, b - a);
        Token t{DIRECTIVE, d, d, line, user};
        size_t p = d.find_first_not_of(" \t#");
        if (p != std::string::npos && is_digit(d[p])) {
            int n = atoi(d.c_str() + p);
            size_t q1 = d.find('"'), q2 = d.rfind('"');
            if (q1 != std::string::npos && q2 > q1) {
                std::string file = d.substr(q1 + 1, q2 - q1 - 1);
                std::string flags = d.substr(q2 + 1);
                bool system = flags.find(" 3") != std::string::npos;
                user = !system && !file.empty() && file[0] != '<';
                if (file == main_file) {
                    std::string esc;
                    for (char c : display) {
                        if (c == '"' || c == '\\') esc += '\\';
                        esc += c;
                    }
                    t.out = d.substr(0, q1 + 1) + esc + d.substr(q2);
                }
            }
            line = n - 1;  // the newline ending the directive makes it n
        }
        t.user = user;
        toks.push_back(t);
    }

    void run() {
        size_t i = 0, n = s.size();
        bool line_start = true;
        while (i < n) {
            char c = s[i];
            if (c == '\n') {
                push(NEWLINE, i, i + 1);
                line++;
                i++;
                line_start = true;
                continue;
            }
            if (c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v') {
                size_t j = i;
                while (j < n && (s[j] == ' ' || s[j] == '\t' || s[j] == '\r' || s[j] == '\f' || s[j] == '\v')) j++;
                push(SPACE, i, j);
                i = j;
                continue;
            }
            if (c == '#' && line_start) {
                size_t j = s.find('\n', i);
                if (j == std::string::npos) j = n;
                directive(i, j);
                i = j;
                continue;
            }
            line_start = false;
            if (c == '/' && i + 1 < n && s[i + 1] == '/') {  // comments (clang -E drops them)
                size_t j = s.find('\n', i);
                if (j == std::string::npos) j = n;
                push(SPACE, i, j);
                i = j;
                continue;
            }
            if (c == '/' && i + 1 < n && s[i + 1] == '*') {
                size_t j = s.find("*/", i + 2);
                j = j == std::string::npos ? n : j + 2;
                // keep the newlines of a multi-line comment
                for (size_t k = i; k < j; k++) {
                    if (s[k] == '\n') {
                        push(NEWLINE, k, k + 1);
                        line++;
                    }
                }
                i = j;
                continue;
            }
            if (is_ident_start(c)) {
                size_t j = i;
                while (j < n && is_ident_char(s[j])) j++;
                std::string id = s.substr(i, j - i);
                bool prefix = id == "u8" || id == "u" || id == "U" || id == "L" || id == "R" ||
                              id == "u8R" || id == "uR" || id == "UR" || id == "LR";
                if (prefix && j < n && (s[j] == '"' || s[j] == '\'')) {
                    j = string_end(j, id.back() == 'R');
                    push(STRING, i, j);
                } else {
                    push(IDENT, i, j);
                }
                i = j;
                continue;
            }
            if (is_digit(c) || (c == '.' && i + 1 < n && is_digit(s[i + 1]))) {
                size_t j = i + 1;
                while (j < n) {
                    char d = s[j];
                        if ((d == '+' || d == '-') && strchr("eEpP", s[j - 1])) {
                        // an exponent sign (1e-3, 0x1p+4) belongs to the number,
                        // but e is a digit in hex: 0x1e+2 is 0x1e + 2
                        bool hex = s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'X');
                        if (hex && (s[j - 1] == 'e' || s[j - 1] == 'E')) break;
                        j++;
                        continue;
                    }
                    if (is_ident_char(d) || d == '.' || (d == '\'' && j + 1 < n && is_ident_char(s[j + 1]))) {
                        j++;
                        continue;
                    }
                    break;
                }
                push(NUMBER, i, j);
                i = j;
                continue;
            }
            if (c == '"' || c == '\'') {
                size_t j = string_end(i, false);
                push(STRING, i, j);
                i = j;
                continue;
            }
            size_t len = 1;
            for (int k = 0; kPunct3[k]; k++)
                if (s.compare(i, 3, kPunct3[k]) == 0) len = 3;
            if (len == 1)
                for (int k = 0; kPunct2[k]; k++)
                    if (s.compare(i, 2, kPunct2[k]) == 0) len = 2;
            push(PUNCT, i, i + len);
            i += len;
        }
    }

    // End of a string or character literal starting at the quote s[q]
    // (raw: R"delim( ... )delim").
    size_t string_end(size_t q, bool raw) {
        size_t n = s.size();
        if (raw && s[q] == '"') {
            size_t paren = s.find('(', q);
            if (paren == std::string::npos) return n;
            std::string close = ")" + s.substr(q + 1, paren - q - 1) + "\"";
            size_t e = s.find(close, paren);
            return e == std::string::npos ? n : e + close.size();
        }
        char quote = s[q];
        size_t j = q + 1;
        while (j < n && s[j] != quote && s[j] != '\n') {
            if (s[j] == '\\') j++;
            j++;
        }
        return j < n ? j + 1 : n;
    }
};

// ---------------------------------------------------------------------------
// Kernel signatures
// ---------------------------------------------------------------------------
struct Attr {
    std::string name;  // buffer, threadgroup, thread_position_in_grid, host_name, ...
    std::string arg;   // text inside the parentheses, if any
};

struct Param {
    std::string name;
    int kind = 0;      // camel_sim_param_kind
    int index = -1;    // buffer / threadgroup index
    bool pointer = false;
    bool reference = false;
    std::string builtin;  // for CAMEL_SIM_PARAM_BUILTIN: the attribute name
    std::string space;    // "device", "constant", "threadgroup" or ""
    bool pointee_const = false;  // const before the '*' or '&': memory it cannot write
    std::set<std::string> type_words;  // the identifiers of its type
    int position = 0;     // in the parameter list
    bool absent = false;  // [[function_constant(name)]] with name false or without a value in
                          // this specialisation: not declared (MSL 5.8.1.2), bound to nothing
    std::string constant;  // absent: why, "function constant 'name' is false" (for messages)
};

struct Kernel {
    std::string qualified;   // ns::name
    std::string targs;       // "<float, 64>" for a template instantiation
    std::string host_name;   // name the host asks for
    std::vector<Param> params;
    std::string body_owner;  // function whose body decides needs_fibers
    int line = 0;
};

struct BuiltinInfo {
    const char *attr;
    const char *field;  // member of camel_sim_thread
    bool vector;        // a uint[3] field (else one uint32_t)
};
const BuiltinInfo kBuiltins[] = {
    {"thread_position_in_grid", "thread_position_in_grid", true},
    {"thread_position_in_threadgroup", "thread_position_in_threadgroup", true},
    {"threadgroup_position_in_grid", "threadgroup_position_in_grid", true},
    {"threads_per_threadgroup", "threads_per_threadgroup", true},
    {"dispatch_threads_per_threadgroup", "dispatch_threads_per_threadgroup", true},
    {"threadgroups_per_grid", "threadgroups_per_grid", true},
    {"threads_per_grid", "threads_per_grid", true},
    {"grid_size", "threads_per_grid", true},
    {"thread_index_in_threadgroup", "thread_index_in_threadgroup", false},
    {"thread_index_in_simdgroup", "thread_index_in_simdgroup", false},
    {"thread_index_in_quadgroup", "thread_index_in_quadgroup", false},
    {"simdgroup_index_in_threadgroup", "simdgroup_index_in_threadgroup", false},
    {"simdgroups_per_threadgroup", "simdgroups_per_threadgroup", false},
    {"dispatch_simdgroups_per_threadgroup", "simdgroups_per_threadgroup", false},
    {"threads_per_simdgroup", "threads_per_simdgroup", false},
    {"thread_execution_width", "threads_per_simdgroup", false},
    {"quadgroup_index_in_threadgroup", "quadgroup_index_in_threadgroup", false},
    {"quadgroups_per_threadgroup", "quadgroups_per_threadgroup", false},
    {"dispatch_quadgroups_per_threadgroup", "quadgroups_per_threadgroup", false},
    {"grid_origin", nullptr, true},  // always 0 for compute dispatches
    {nullptr, nullptr, false},
};
const BuiltinInfo *find_builtin(const std::string &name) {
    for (const BuiltinInfo *b = kBuiltins; b->attr; b++)
        if (name == b->attr) return b;
    return nullptr;
}

// MSL vector type names that may be used as constructors: float4(a, b).
bool is_vector_type(const std::string &id) {
    static const char *const bases[] = {"float", "half", "int", "uint", "short", "ushort", "char",
                                        "uchar", "long", "ulong", "bool", "bfloat", nullptr};
    std::string s = id;
    if (s.compare(0, 7, "packed_") == 0) s = s.substr(7);
    if (s.size() < 2) return false;
    char n = s.back();
    if (n != '2' && n != '3' && n != '4') return false;
    std::string base = s.substr(0, s.size() - 1);
    for (int i = 0; bases[i]; i++)
        if (base == bases[i]) return true;
    return false;
}

// The standard C++ attributes we leave in place.
bool is_std_attribute(const std::string &name) {
    return name == "likely" || name == "unlikely" || name == "maybe_unused" ||
           name == "fallthrough" || name == "nodiscard" || name == "noreturn" ||
           name == "deprecated";
}

// Identifiers that make a kernel run its threads as fibers.
bool is_fiber_op(const std::string &id) {
    return id == "threadgroup_barrier" || id == "simdgroup_barrier" ||
           id.compare(0, 5, "simd_") == 0 || id.compare(0, 5, "quad_") == 0 ||
           id == "simdgroup_load" || id == "simdgroup_store" || id == "simdgroup_multiply" ||
           id == "simdgroup_multiply_accumulate";
}

// ---------------------------------------------------------------------------
// The rewriter
// ---------------------------------------------------------------------------
enum ScopeKind { NAMESPACE, CLASS, FUNCTION, BLOCK, INIT };

struct Scope {
    ScopeKind kind;
    std::string name;      // namespace or function name
    size_t stmt_start;     // index in sig of the statement that opened it
    size_t open;           // index in sig of '{'
};

struct FunctionInfo {
    size_t body_begin, body_end;  // sig indices, '{' .. '}'
    int line;
    size_t stmt = 0;              // sig index of the statement that declares it
};

struct Rewriter {
    std::vector<Token> &t;
    std::string display;
    Target target = TARGET_SIM;
    std::string prefix = "[sim] ";        // of every message
    std::string shim = "the simulator";   // "... is not supported by the simulator"
    std::string only_kernel;  // non-empty: entry wrappers for this kernel only (a specialisation)
    bool skipped(const Kernel &kn) const {
        if (only_kernel.empty()) return false;
        std::string host;  // [[host_name("a" "b")]] after macro expansion: "ab"
        for (char ch : kn.host_name)
            if (ch != '"') host += ch;
        return host != only_kernel;
    }
    std::vector<size_t> sig;  // indices of significant tokens (not space/newline/directive)
    std::string errors;
    std::vector<Kernel> kernels;
    std::map<std::string, std::vector<Param>> kernel_templates;  // qualified name -> params
    std::map<std::string, int> kernel_template_line;
    std::map<std::string, std::vector<FunctionInfo>> functions;   // user function bodies by name
    std::vector<size_t> tg_storage;  // sig indices of threadgroup variable declarations
    struct Definition {
        size_t stmt, open, close;  // sig indices: the statement, its '{' and its '}'
        size_t parent;             // the '{' of the enclosing namespace or class (-1: none)
        bool is_class;
    };
    std::vector<Definition> definitions;  // functions and classes, at namespace or class scope
    // Names that may stand for a vector type: aliases of one (typedef float4 vec4_t;
    // using f2 = float2;) and template type parameters (template <typename T>).
    // T(a, b) and (T)v construct and convert through them as through float4.
    std::set<std::string> vector_aliases, type_params;

    bool names_vector_type(const std::string &x) { return is_vector_type(x) || vector_aliases.count(x); }

    // The type names of the user's code, collected before the rewrite.
    void collect_type_names() {
        for (size_t k = 0; k + 2 < sig.size(); k++) {
            if (!S(k).user) continue;
            if (is(k, "template") && is(k + 1, "<")) {
                size_t e = match(k + 1) - 1;  // the closing '>'
                for (size_t j = k + 2; j + 1 <= e; j++) {
                    bool starts = is(j - 1, "<") || is(j - 1, ",");
                    if (starts && (is(j, "typename") || is(j, "class")) && S(j + 1).kind == IDENT &&
                        (is(j + 2, ",") || is(j + 2, "=") || j + 2 == e))
                        type_params.insert(txt(j + 1));
                }
            }
            // typedef float4 name;  typedef metal::float4 name;  using name = float4;
            size_t v = k + 1;
            if (is(k, "typedef")) {
                if (is(v, "metal") && is(v + 1, "::")) v += 2;
                if (names_vector_type(txt(v)) && S(v + 1).kind == IDENT && is(v + 2, ";"))
                    vector_aliases.insert(txt(v + 1));
            } else if (is(k, "using") && S(k + 1).kind == IDENT && is(k + 2, "=")) {
                v = k + 3;
                if (is(v, "metal") && is(v + 1, "::")) v += 2;
                if (names_vector_type(txt(v)) && is(v + 1, ";")) vector_aliases.insert(txt(k + 1));
            }
        }
    }

    Rewriter(std::vector<Token> &toks, const std::string &disp) : t(toks), display(disp) {
        for (size_t i = 0; i < t.size(); i++)
            if (t[i].kind != SPACE && t[i].kind != NEWLINE && t[i].kind != DIRECTIVE) sig.push_back(i);
    }

    Token &S(size_t k) { return t[sig[k]]; }
    const std::string &txt(size_t k) { return k < sig.size() ? t[sig[k]].text : empty(); }
    static const std::string &empty() {
        static std::string e;
        return e;
    }
    bool is(size_t k, const char *s) { return k < sig.size() && t[sig[k]].text == s; }

    void error(int line, const std::string &msg) {
        errors += prefix + display + ":" + std::to_string(line) + ": " + msg + "\n";
    }
    void error_at(size_t k, const std::string &msg) { error(S(k).line, msg); }

    // Blank a token (spaces of the same width keep the columns).
    void blank(size_t k) { S(k).out = std::string(S(k).text.size(), ' '); }

    // Index just past the bracket that matches the one at k ( ( [ { < ).
    size_t match(size_t k) {
        const std::string &o = txt(k);
        std::string c = o == "(" ? ")" : o == "[" ? "]" : o == "{" ? "}" : ">";
        int depth = 0;
        for (size_t j = k; j < sig.size(); j++) {
            const std::string &x = txt(j);
            if (x == o) depth++;
            else if (x == c) depth--;
            else if (o == "<" && x == ">>") depth -= 2;
            if (depth <= 0) return j + 1;
        }
        return sig.size();
    }

    // [[ ... ]] starting at k: returns the index past ']]' and the attributes.
    size_t parse_attributes(size_t k, std::vector<Attr> &attrs) {
        size_t j = k + 2;
        while (j < sig.size() && !(is(j, "]") && is(j + 1, "]"))) {
            if (S(j).kind == IDENT) {
                Attr a;
                a.name = txt(j);
                j++;
                while (is(j, "::")) {  // gnu::always_inline
                    a.name += "::" + txt(j + 1);
                    j += 2;
                }
                if (is(j, "(")) {
                    size_t e = match(j);
                    for (size_t m = j + 1; m + 1 < e; m++) a.arg += txt(m);
                    j = e;
                }
                attrs.push_back(a);
            } else {
                j++;
            }
        }
        return j + 2;
    }

    void blank_range(size_t a, size_t b) {
        for (size_t k = a; k < b && k < sig.size(); k++)
            if (S(k).user) blank(k);
    }

    // ---- the main pass --------------------------------------------------
    bool run() {
        collect_type_names();
        std::vector<Scope> scopes;
        size_t stmt = 0;  // start of the current statement at namespace/class scope
        int paren = 0;    // parenthesis depth in the current statement

        auto in_function = [&]() {
            for (auto &s : scopes)
                if (s.kind == FUNCTION) return true;
            return false;
        };
        auto at_namespace = [&]() { return scopes.empty() || scopes.back().kind == NAMESPACE; };

        for (size_t k = 0; k < sig.size(); k++) {
            Token &tok = S(k);
            const std::string &x = tok.text;

            // Attributes in user code are recorded by the statement parser and blanked.
            if (x == "[" && is(k + 1, "[") && tok.user) {
                std::vector<Attr> attrs;
                size_t e = parse_attributes(k, attrs);
                bool keep = !attrs.empty();
                for (auto &a : attrs) keep = keep && is_std_attribute(a.name);
                if (!keep) blank_range(k, e);
                for (auto &a : attrs)
                    if (a.name == "vertex" || a.name == "fragment" || a.name == "visible" ||
                        a.name == "mesh" || a.name == "object")
                        error_at(k, "[[" + a.name + "]] functions are not supported by " + shim + " (compute kernels only)");
                for (auto &a : attrs) {
                    if (a.name != "function_constant") continue;
                    std::vector<Attr> unused;
                    if (!scopes.empty() && scopes.back().kind == CLASS)
                        error_at(k, "[[function_constant(...)]] on a structure member is not supported by " +
                                        shim + ": MSL 5.8.1.6 allows it in a structure that a graphics or "
                                        "user function returns or that a function takes by value (a "
                                        "[[stage_in]] input or a structure of buffers), which " + shim +
                                        " does not take as kernel arguments; use an optional kernel "
                                        "argument instead ([[buffer(i), function_constant(name)]])");
                    else if (in_function() || paren <= 0 || !is_kernel_statement(stmt, k, unused))
                        error_at(k, "[[function_constant(...)]] here is not supported by " + shim +
                                        ": only on a kernel's parameters (an optional argument, MSL "
                                        "5.8.1.2)");
                }
                k = e - 1;
                continue;
            }
            if (x == "[" && tok.user && lambda_at(k))
                error_at(k, "lambda expressions are not supported by Metal (MSL: C++14 features "
                            "Metal lacks); write a helper function");
            if (x == "(" || x == "[") paren++;
            if (x == ")" || x == "]") paren--;

            if (x == "{" && tok.user && in_function()) braced_argument(k);
            if (x == "{") {
                ScopeKind kind = BLOCK;
                std::string name;
                if (!in_function() && (at_namespace() || scopes.back().kind == CLASS)) {
                    kind = classify(stmt, k, name);
                } else if (!scopes.empty() && scopes.back().kind == INIT) {
                    kind = INIT;
                }
                scopes.push_back({kind, name, stmt, k});
                if (kind == FUNCTION && tok.user) function_begins(stmt, k, name, scopes);
                if (kind == NAMESPACE || kind == CLASS || kind == FUNCTION) {
                    stmt = k + 1;
                    paren = 0;
                }
                continue;
            }
            if (x == "}") {
                if (scopes.empty()) continue;
                Scope s = scopes.back();
                scopes.pop_back();
                if ((s.kind == FUNCTION || s.kind == CLASS) && tok.user && S(s.stmt_start).user)
                    definitions.push_back({s.stmt_start, s.open, k,
                                           scopes.empty() ? (size_t)-1 : scopes.back().open,
                                           s.kind == CLASS});
                if (s.kind == FUNCTION) {
                    if (tok.user) functions[s.name].push_back({s.open, k, S(s.open).line, s.stmt_start});
                    stmt = k + 1;
                    paren = 0;
                } else if (s.kind == NAMESPACE) {
                    stmt = k + 1;
                    paren = 0;
                } else if (s.kind == CLASS || s.kind == INIT) {
                    // the statement goes on: struct S { } s;  float k[] = {1, 2};
                    stmt = s.stmt_start;
                    paren = 0;
                }
                continue;
            }
            if (x == ";" && !in_function() && (scopes.empty() || scopes.back().kind != INIT)) {
                if (at_namespace() && stmt < k && S(stmt).user) {
                    declaration_ends(stmt, k, scopes);
                    program_scope_variable(stmt, k);
                }
                stmt = k + 1;
                paren = 0;
                continue;
            }

            if (!tok.user) continue;
            if (tok.kind == NUMBER) {
                number(k);
                continue;
            }
            if (tok.kind != IDENT) continue;

            // ---- the portability guard --------------------------------
            guard(k);

            // ---- what Apple's compiler rejects and clang would accept -----
            if (in_function()) atomic_in_thread_memory(k);
            if (x.compare(0, 13, "memory_order_") == 0 && x != "memory_order_relaxed" &&
                enclosing_call(k) != "atomic_thread_fence")
                error_at(k, "'" + x + "': Metal's atomic functions support only "
                            "memory_order_relaxed (MSL, \"Atomic Functions\")");

            // ---- address spaces -----------------------------------------
            if (x == "device" || x == "thread") {
                if (target != TARGET_CHECK) blank(k);  // the check keeps them (camel_check_msl.h)
            } else if (x == "constant") {
                bool top = at_namespace() && !in_function() && paren == 0;
                bool has_static = k > 0 && (is(k - 1, "static") || is(k - 1, "constexpr"));
                // constant float S::k = 1;  defines a static member: no second 'static'
                if (top && !has_static) has_static = defines_member(k);
                tok.out = top && !has_static ? "static const" : "const   ";
                if (target == TARGET_CHECK) tok.out = (top && !has_static ? "static const " : "const ") + x;
            } else if (x == "threadgroup") {
                bool kernel_body = false;
                for (auto &sc : scopes)
                    if (sc.kind == FUNCTION) {
                        std::vector<Attr> attrs;
                        kernel_body = is_kernel_statement(sc.stmt_start, sc.open, attrs);
                        break;
                    }
                threadgroup(k, in_function(), kernel_body);
            } else if (x == "kernel" && !in_function()) {
                blank(k);
            } else if ((x == "vertex" || x == "fragment") && !in_function() && at_namespace()) {
                error_at(k, "'" + x + "' functions are not supported by " + shim + " (compute kernels only)");
            } else if (x == "static_cast" && is(k + 1, "<") && k + 2 < sig.size() &&
                       is_vector_type(txt(k + 2)) && is(k + 3, ">") && is(k + 4, "(")) {
                tok.out = "__camel_make";  // static_cast<float4>(int4) converts in MSL
            } else if (names_vector_type(x) && is(k + 1, "(") && !(k > 0 && is(k - 1, "operator"))) {
                tok.out = "__camel_make<" + x + ">";
            } else if (names_vector_type(x) && k > 0 && is(k - 1, "(") && is(k + 1, ")") &&
                       cast_context(k - 1) && operand_start(k + 2)) {
                // (float4)x: a conversion in MSL, a bit cast in clang
                S(k - 1).out = "";
                tok.out = "__camel_conv<" + x + ">() ->*";
                S(k + 1).out = "";
            } else if (type_params.count(x) && in_function() && !(k > 0 && (is(k - 1, "::") ||
                       is(k - 1, ".") || is(k - 1, "->")))) {
                // T(a, b) and (T)v with T = float4: what float4 would do; any other T
                // is constructed or cast as written (__camel_construct, __camel_cast)
                if (is(k + 1, "(") && !(k > 0 && is(k - 1, "operator"))) {
                    tok.out = "__camel_construct<" + x + ">";
                } else if (k > 0 && is(k - 1, "(") && is(k + 1, ")") && cast_context(k - 1) &&
                           operand_start(k + 2)) {
                    S(k - 1).out = "";
                    tok.out = "__camel_cast<" + x + ">() ->*";
                    S(k + 1).out = "";
                }
            }
        }
        return errors.empty();
    }

    // f({1.0f, 2.0f}) with a vector parameter: clang converts no braced list to a
    // vector argument, so a flat list in a call's arguments becomes
    // __camel_list(1.0f, 2.0f), which converts to any vector of that many components.
    void braced_argument(size_t k) {
        if (!(is(k - 1, "(") || is(k - 1, ","))) return;
        size_t close = match(k) - 1;
        if (close <= k + 1 || !is(close, "}")) return;
        for (size_t j = k + 1; j < close; j++)
            if (is(j, "{") || is(j, ";")) return;
        int depth = 0;  // the bracket around the argument: the '(' of a call
        for (size_t j = k; j-- > 0;) {
            const std::string &y = txt(j);
            if (y == ")" || y == "]" || y == "}") depth++;
            if (y == "(" || y == "[" || y == "{") {
                if (depth-- > 0) continue;
                if (y != "(" || j == 0) return;
                const Token &callee = S(j - 1);
                static const char *const not_calls[] = {"if", "while", "for", "switch", "return",
                                                        "sizeof", "alignof", "decltype", nullptr};
                for (const char *const *w = not_calls; *w; w++)
                    if (callee.text == *w) return;
                if (!(callee.kind == IDENT || callee.text == ">") || names_vector_type(callee.text))
                    return;
                break;
            }
            if (y == ";") return;
        }
        S(k).out = "__camel_list(";
        S(close).out = ")";
    }

    // Does the declaration starting at k name a qualified declarator (S::k = ...)?
    bool defines_member(size_t k) {
        int depth = 0;
        for (size_t j = k + 1; j + 2 < sig.size(); j++) {
            const std::string &y = txt(j);
            if (y == "<" || y == "(") depth++;
            if (y == ">" || y == ")") depth--;
            if (y == ";" || y == "=" || y == "{") return false;
            if (depth == 0 && S(j).kind == IDENT && is(j + 1, "::") && S(j + 2).kind == IDENT &&
                (is(j + 3, "=") || is(j + 3, ";") || is(j + 3, "[") || is(j + 3, "{")))
                return true;
        }
        return false;
    }

    // '[' at k opens a lambda's capture list if it cannot be a subscript.
    bool lambda_at(size_t k) {
        if (k == 0 || is(k + 1, "[")) return false;
        const Token &p = S(k - 1);
        if (p.kind == IDENT) return p.text == "return";
        static const char *const before[] = {"=", "(", ",", "{", ";", "?", ":", "}", "&&", "||",
                                             nullptr};
        for (const char *const *b = before; *b; b++)
            if (p.text == *b) {
                size_t e = match(k);  // [captures] then ( or {
                return is(e, "(") || is(e, "{");
            }
        return false;
    }

    // The function whose argument list holds token k ("" if none).
    std::string enclosing_call(size_t k) {
        int depth = 0;
        for (size_t j = k; j-- > 0;) {
            const std::string &x = txt(j);
            if (x == ")" || x == "]" || x == "}") depth++;
            if (x == "(" || x == "[" || x == "{") {
                if (depth == 0) return x == "(" && j > 0 && S(j - 1).kind == IDENT ? txt(j - 1) : "";
                depth--;
            }
            if (x == ";" && depth == 0) return "";
        }
        return "";
    }

    static bool is_atomic_type(const std::string &x) {
        return x == "atomic" || x == "atomic_int" || x == "atomic_uint" || x == "atomic_float" ||
               x == "atomic_bool" || x == "atomic_long" || x == "atomic_ulong";
    }

    // atomic_int a; in a function body: an atomic in thread memory.
    void atomic_in_thread_memory(size_t k) {
        if (!is_atomic_type(txt(k)) || k == 0) return;
        size_t s = k;
        while (s > 0 && (is(s - 1, "const") || is(s - 1, "volatile") || is(s - 1, "thread"))) s--;
        if (s == 0 || !(is(s - 1, ";") || is(s - 1, "{") || is(s - 1, "}"))) return;
        size_t n = k + 1;
        if (is(n, "<")) n = match(n);
        if (n < sig.size() && S(n).kind == IDENT)
            error_at(k, "'" + txt(n) + "': atomic types live in device or threadgroup memory; "
                        "Metal does not support atomics in thread memory");
    }

    // A declaration at namespace scope (stmt..semi) that defines a variable
    // must be in the constant address space (MSL, "Program Scope Variables").
    void program_scope_variable(size_t stmt, size_t semi) {
        static const char *const skip[] = {"using", "typedef", "template", "static_assert",
                                           "namespace", "extern", "friend", nullptr};
        for (const char *const *w = skip; *w; w++)
            if (is(stmt, *w)) return;
        int depth = 0;
        bool constant = false, threadgroup_seen = false, after_class = false;
        size_t name_at = 0;
        for (size_t j = stmt; j < semi; j++) {
            const std::string &x = txt(j);
            if (x == "[" && is(j + 1, "[") && depth == 0) {
                std::vector<Attr> a;
                j = parse_attributes(j, a) - 1;
                continue;
            }
            if (depth == 0 && x == "(") return;  // a function declaration
            if (depth == 0 && x == "=") break;   // the initializer
            if (x == "(" || x == "[" || x == "{" || x == "<") depth++;
            if (x == ")" || x == "]" || x == "}" || x == ">") {
                depth--;
                if (depth == 0 && x == "}") after_class = true;
            }
            if (x == ">>") depth -= 2;
            if (depth != 0 || S(j).kind != IDENT) continue;
            if (x == "constant" || x == "constexpr") constant = true;
            if (x == "threadgroup") threadgroup_seen = true;
            name_at = j;
        }
        if (is(stmt, "struct") || is(stmt, "class") || is(stmt, "union") || is(stmt, "enum")) {
            // struct S;  struct S { ... };  are types; struct S { ... } s; declares s
            bool var = false;
            int d = 0;
            for (size_t j = stmt; j < semi && !var; j++) {
                if (is(j, "{")) d++;
                if (is(j, "}")) d--;
                if (d == 0 && is(j, "}") && j + 1 < semi && S(j + 1).kind == IDENT) var = true;
            }
            if (!var) return;
        } else if (after_class) {
            return;  // float x{1.0f}; (not told apart from other braces here)
        }
        if (name_at == 0 || constant) return;
        if (threadgroup_seen) {
            error_at(stmt, "threadgroup variable '" + txt(name_at) + "' at program scope: MSL allows "
                           "threadgroup variables only inside a kernel function");
        } else {
            error_at(stmt, "program scope variable '" + txt(name_at) + "' must reside in the "
                           "constant address space (MSL, \"Program Scope Variables\"): write "
                           "constant " + txt(stmt) + " ...");
        }
    }

    // '(' at k starts a C-style cast if it cannot be a call or a declarator.
    bool cast_context(size_t k) {
        if (k == 0) return true;
        const Token &p = S(k - 1);
        if (p.kind == IDENT)
            return p.text == "return" || p.text == "case" || p.text == "else" || p.text == "do";
        if (p.kind == NUMBER || p.kind == STRING) return false;
        return p.text != ")" && p.text != "]" && p.text != ">";
    }
    bool operand_start(size_t k) {
        if (k >= sig.size()) return false;
        const Token &n = S(k);
        if (n.kind == IDENT || n.kind == NUMBER) return true;
        return n.text == "(" || n.text == "-" || n.text == "+" || n.text == "!" || n.text == "~" ||
               n.text == "*" || n.text == "&";
    }

    void number(size_t k) {
        Token &tok = S(k);
        std::string s = tok.text;
        bool hex = s.size() > 1 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
        bool is_float = hex ? (s.find_first_of("pP") != std::string::npos)
                            : (s.find_first_of(".eE") != std::string::npos);
        if (!is_float) return;
        char last = s.back();
        if (s.size() > 3 && (s.compare(s.size() - 3, 3, "f16") == 0 || s.compare(s.size() - 3, 3, "F16") == 0))
            return;
        if (last == 'f' || last == 'F') return;
        if (last == 'h' || last == 'H') {
            tok.out = s.substr(0, s.size() - 1) + "f16";
            return;
        }
        if (last == 'l' || last == 'L') {
            error_at(k, "'" + s + "' is a long double literal; Metal has no double: use " +
                            s.substr(0, s.size() - 1) + "f");
            return;
        }
        if (is_digit(last) || last == '.') tok.out = s + "f";  // MSL has no double: 1.5 is a float
    }

    void guard(size_t k) {
        const std::string &x = txt(k);
        if (x == "double") {
            error_at(k, "'double' is not supported by Metal; use float");
        } else if (x == "new" || (x == "delete" && !(k > 0 && is(k - 1, "=")))) {
            error_at(k, "'" + x + "' is not supported by Metal: there is no dynamic memory in a kernel; "
                            "use a buffer or threadgroup memory");
        } else if (x == "try" || x == "catch" || x == "throw") {
            error_at(k, "'" + x + "': exceptions are not supported by Metal");
        } else if (x == "virtual") {
            error_at(k, "'virtual' functions are not supported by Metal");
        } else if (x == "typeid" || x == "dynamic_cast") {
            error_at(k, "'" + x + "' (run-time type information) is not supported by Metal");
        } else if (x == "noexcept") {
            // MSL lacks the noexcept operator; Apple accepts the specifier: f() const noexcept
            bool specifier = k > 0 && (is(k - 1, ")") || is(k - 1, "const") || is(k - 1, "&") ||
                                       is(k - 1, "&&") || is(k - 1, "volatile"));
            if (!specifier) error_at(k, "the 'noexcept' operator is not supported by Metal");
        } else if (x == "thread_local" || x == "register") {
            error_at(k, "'" + x + "' is not supported by Metal");
        } else if (x == "goto") {
            error_at(k, "'goto' is not supported by Metal");
        }
    }

    // What does the '{' at k open? stmt..k-1 is the statement before it.
    ScopeKind classify(size_t stmt, size_t k, std::string &name) {
        bool has_paren = false, has_class = false, has_assign = false;
        int depth = 0;
        for (size_t j = stmt; j < k; j++) {
            const std::string &x = txt(j);
            if (x == "namespace" && depth == 0) {
                name = S(j + 1).kind == IDENT ? txt(j + 1) : "";
                return NAMESPACE;
            }
            if (x == "extern" && j + 1 < k && S(j + 1).kind == STRING && j + 2 == k) return NAMESPACE;
            if (x == "template" && is(j + 1, "<")) {  // template <int N = 4>: not an initializer
                j = match(j + 1) - 1;
                continue;
            }
            if (x == "[" && is(j + 1, "[")) {  // skip attributes
                std::vector<Attr> a;
                j = parse_attributes(j, a) - 1;
                continue;
            }
            if (gnu_attribute_at(j)) {  // struct __attribute__((packed)) S { ... }
                j = match(j + 1) - 1;
                continue;
            }
            if (x == "(" || x == "[") {
                if (depth == 0 && x == "(") has_paren = true;
                depth++;
            } else if (x == ")" || x == "]") {
                depth--;
            } else if (depth == 0 && (x == "struct" || x == "class" || x == "union" || x == "enum")) {
                has_class = true;
            } else if (depth == 0 && x == "=") {
                has_assign = true;
            }
        }
        if (has_paren && !has_assign) {
            name = function_name(stmt, k);
            return FUNCTION;
        }
        if (has_paren && has_assign) return FUNCTION;  // a lambda at namespace scope
        if (has_class && !has_assign) return CLASS;
        return INIT;
    }

    // GNU attributes (`__attribute__((always_inline))`, Apple's METAL_FUNC) are no
    // function's parameter list: the name and the kind of a declaration skip them.
    bool gnu_attribute_at(size_t j) {
        return (is(j, "__attribute__") || is(j, "__attribute")) && is(j + 1, "(");
    }

    // Name of the function declared by the statement: the identifier before
    // the first top-level '(' (and before template arguments: f<float>(...)).
    std::string function_name(size_t stmt, size_t end, size_t *paren_at = nullptr,
                              size_t *name_at = nullptr) {
        int angle = 0;
        for (size_t j = stmt; j < end; j++) {
            const std::string &x = txt(j);
            if (x == "[" && is(j + 1, "[")) {
                std::vector<Attr> a;
                j = parse_attributes(j, a) - 1;
                continue;
            }
            if (x == "template" && is(j + 1, "<")) {
                j = match(j + 1) - 1;
                continue;
            }
            if (gnu_attribute_at(j)) {  // inline __attribute__((always_inline)) void h(...)
                j = match(j + 1) - 1;
                continue;
            }
            if (x == "<") angle++;
            if (x == ">") angle--;
            if (x == ">>") angle -= 2;
            if (x == "(" && angle <= 0) {
                if (j == stmt) return std::string();  // (void)f(); is not a declaration
                size_t n = j - 1;
                if (n > stmt && (is(n, ">") || is(n, ">>"))) {  // f<float, 64>(
                    int d = 0;
                    while (n > stmt) {
                        if (is(n, ">")) d++;
                        if (is(n, ">>")) d += 2;
                        if (is(n, "<")) d--;
                        n--;
                        if (d == 0) break;
                    }
                }
                if (paren_at) *paren_at = j;
                if (name_at) *name_at = n;
                return S(n).kind == IDENT ? txt(n) : std::string();
            }
        }
        return std::string();
    }

    std::string qualify(const std::vector<Scope> &scopes, const std::string &name) {
        std::string q;
        for (auto &s : scopes)
            if (s.kind == NAMESPACE && !s.name.empty()) q += s.name + "::";
        return q + name;
    }

    // Does the statement stmt..end contain `kernel` or [[kernel]] at top level?
    bool is_kernel_statement(size_t stmt, size_t end, std::vector<Attr> &attrs) {
        bool kernel = false;
        int depth = 0;
        for (size_t j = stmt; j < end; j++) {
            if (is(j, "[") && is(j + 1, "[") && depth == 0) {
                std::vector<Attr> a;
                j = parse_attributes(j, a) - 1;
                for (auto &x : a) {
                    if (x.name == "kernel") kernel = true;
                    attrs.push_back(x);
                }
                continue;
            }
            if (is(j, "(")) depth++;
            if (is(j, ")")) depth--;
            if (depth == 0 && is(j, "kernel")) kernel = true;
        }
        return kernel;
    }

    // A function definition begins: record kernels.
    void function_begins(size_t stmt, size_t open, const std::string &name,
                         const std::vector<Scope> &scopes) {
        std::vector<Attr> attrs;
        if (!is_kernel_statement(stmt, open, attrs)) return;
        std::vector<Scope> outer(scopes.begin(), scopes.end() - 1);
        size_t paren_at = 0, name_at = 0;
        function_name(stmt, open, &paren_at, &name_at);
        Kernel kn;
        kn.qualified = qualify(outer, name);
        kn.line = S(name_at).line;
        kn.body_owner = name;
        if (name_at == 0 || !is(name_at - 1, "void")) {
            error(kn.line, "kernel '" + name + "' must return void (results go to buffers)");
            return;
        }
        if (!parse_params(paren_at, kn.params)) return;
        bool width = false, per_simd = false;
        for (auto &p : kn.params) {
            width = width || p.builtin == "thread_execution_width";
            per_simd = per_simd || p.builtin == "threads_per_simdgroup";
        }
        if (width && per_simd)
            error(kn.line, "kernel '" + name + "' declares both [[thread_execution_width]] and "
                           "[[threads_per_simdgroup]]; MSL makes them aliases of one builtin, so "
                           "a kernel may use only one (prefer threads_per_simdgroup)");
        bool is_template = is(stmt, "template") && is(stmt + 1, "<");
        if (is_template) {
            kernel_templates[kn.qualified] = kn.params;
            kernel_template_line[kn.qualified] = kn.line;
            return;
        }
        kn.host_name = name;
        for (auto &a : attrs)
            if (a.name == "host_name") kn.host_name = unquote(a.arg);
        kernels.push_back(kn);
    }

    // A declaration at namespace scope ends at ';': explicit instantiations
    // of kernel templates: template [[host_name("x")]] kernel void f<T>(...);
    void declaration_ends(size_t stmt, size_t semi, const std::vector<Scope> &scopes) {
        if (!(is(stmt, "template") && !is(stmt + 1, "<"))) return;
        std::vector<Attr> attrs;
        bool kernel = is_kernel_statement(stmt, semi, attrs);
        size_t paren_at = 0, name_at = 0;
        std::string name = function_name(stmt, semi, &paren_at, &name_at);
        if (name == "decltype") {
            // template [[host_name("k")]] [[kernel]] decltype(f<float>) f<float>;
            size_t close = match(paren_at);
            if (close < semi && S(close).kind == IDENT) {
                name_at = close;
                name = txt(close);
                paren_at = semi;
                while (name_at + 2 < semi && is(name_at + 1, "::") && S(name_at + 2).kind == IDENT) {
                    name_at += 2;
                    name = txt(name_at);
                }
            }
        }
        bool host_named = false;
        for (auto &a : attrs) host_named = host_named || a.name == "host_name";
        if (name.empty() && (kernel || host_named)) {
            // template [[host_name("k")]] kernel k_t ns::k<float>;  (k_t: a typedef of the
            // function type): the instantiated name is the template-id that ends the statement
            size_t open = 0;
            if (is(semi - 1, ">") || is(semi - 1, ">>")) {
                int d = 0;
                for (size_t j = semi; j-- > stmt;) {
                    if (is(j, ">")) d++;
                    if (is(j, ">>")) d += 2;
                    if (is(j, "<")) d--;
                    if (d == 0) {
                        open = j;
                        break;
                    }
                }
            }
            if (open > stmt + 1 && is(open, "<") && S(open - 1).kind == IDENT) {
                name_at = open - 1;
                name = txt(name_at);
                paren_at = semi;
            }
        }
        if (name.empty() && (kernel || host_named)) {
            // template [[host_name("k")]] kernel k_t k<float>;  would register nothing
            error_at(stmt, "this form of kernel instantiation is not supported by " + shim +
                               " (it would register no kernel); write template "
                               "[[host_name(\"k\")]] [[kernel]] decltype(f<T>) f<T>; or repeat "
                               "the signature: template [[host_name(\"k\")]] kernel void f<T>(...);");
            return;
        }
        if (name.empty()) return;
        std::string written = name;  // template ... void ns::f<float>(...): "ns::f"
        for (size_t n = name_at; n >= stmt + 2 && is(n - 1, "::") && S(n - 2).kind == IDENT; n -= 2)
            written = txt(n - 2) + "::" + written;
        std::string q = qualify(scopes, written);
        auto it = kernel_templates.find(q);
        if (it == kernel_templates.end()) {
            // [[host_name]] promises a kernel: instantiating a helper would register none
            if (kernel || host_named)
                error_at(stmt, "instantiation of '" + name + "', which is not a kernel template "
                               "defined earlier in this file, so it registers no kernel");
            return;
        }
        Kernel kn;
        kn.qualified = q;
        kn.line = S(stmt).line;
        kn.body_owner = name;
        for (size_t j = name_at + 1; j < paren_at; j++) kn.targs += txt(j) + (is(j, ",") ? " " : "");
        kn.params = it->second;
        for (auto &a : attrs)
            if (a.name == "host_name") kn.host_name = unquote(a.arg);
        if (kn.host_name.empty()) {
            error_at(stmt, "template kernel instantiation '" + name + kn.targs +
                               "' needs [[host_name(\"...\")]] so the host can find it by name");
            return;
        }
        kernels.push_back(kn);
    }

    static std::string unquote(const std::string &s) {
        if (s.size() >= 2 && s.front() == '"' && s.back() == '"') return s.substr(1, s.size() - 2);
        return s;
    }

    // Parameters of a kernel: positions, names, pointer-ness and attributes.
    bool parse_params(size_t open, std::vector<Param> &params) {
        size_t close = match(open) - 1;
        size_t j = open + 1;
        bool ok = true;
        while (j < close) {
            // one parameter: j .. next top-level ','
            size_t e = j;
            int depth = 0;
            while (e < close) {
                const std::string &x = txt(e);
                if (x == "(" || x == "[" || x == "<" || x == "{") depth++;
                if (x == ")" || x == "]" || x == ">" || x == "}") depth--;
                if (x == ">>") depth -= 2;
                if (x == "," && depth <= 0) break;
                e++;
            }
            if (!(e == j + 1 && is(j, "void"))) ok = parse_param(j, e, params) && ok;
            j = e + 1;
        }
        return ok;
    }

    bool parse_param(size_t a, size_t b, std::vector<Param> &params) {
        Param p;
        std::vector<Attr> attrs;
        bool space_tg = false, space_buf = false;
        size_t name_at = 0;
        int depth = 0;
        for (size_t j = a; j < b; j++) {
            const std::string &x = txt(j);
            if (x == "[" && is(j + 1, "[")) {
                j = parse_attributes(j, attrs) - 1;
                continue;
            }
            if (x == "=") break;  // default argument
            if (x == "<" || x == "(") depth++;
            if (x == ">" || x == ")") depth--;
            if (depth == 0 && x == "*") p.pointer = true;
            if (depth == 0 && (x == "&" || x == "&&")) p.reference = true;
            if (x == "threadgroup") space_tg = true;
            if (x == "device" || x == "constant") space_buf = true;
            if (depth == 0 && is_space(x)) p.space = x;
            if (depth == 0 && x == "const" && !p.pointer && !p.reference) p.pointee_const = true;
            if (S(j).kind == IDENT && depth == 0) name_at = j;
        }
        p.name = name_at ? txt(name_at) : "";
        for (size_t j = a; j < name_at; j++)
            if (S(j).kind == IDENT) p.type_words.insert(txt(j));
        int line = S(a).line;
        for (auto &at : attrs) {
            if (at.name == "buffer") {
                p.kind = CAMEL_SIM_PARAM_BUFFER;
                p.index = atoi(at.arg.c_str());
            } else if (at.name == "threadgroup") {
                p.kind = CAMEL_SIM_PARAM_THREADGROUP;
                p.index = atoi(at.arg.c_str());
            } else if (find_builtin(at.name)) {
                p.kind = CAMEL_SIM_PARAM_BUILTIN;
                p.builtin = at.name;
            } else if (at.name == "stage_in" || at.name == "texture" || at.name == "sampler") {
                error(line, "kernel parameter '" + p.name + "': [[" + at.name +
                                "]] is not supported by " + shim);
                return false;
            }
            if ((at.name == "buffer" || at.name == "threadgroup") &&
                (at.arg.empty() || !is_digit(at.arg[0]))) {
                error(line, "kernel parameter '" + p.name + "': [[" + at.name + "(" + at.arg +
                                ")]] needs a constant index");
                return false;
            }
        }
        if (p.kind == 0) {
            if (space_tg && p.pointer) {
                p.kind = CAMEL_SIM_PARAM_THREADGROUP;  // index assigned below
            } else if (space_buf && (p.pointer || p.reference)) {
                p.kind = CAMEL_SIM_PARAM_BUFFER;
            } else {
                error(line, "kernel parameter '" + p.name +
                                "' needs an attribute: [[buffer(i)]] for data, or a builtin such "
                                "as [[thread_position_in_grid]]");
                return false;
            }
        }
        if (p.kind == CAMEL_SIM_PARAM_BUFFER && !p.pointer && !p.reference) {
            error(line, "kernel parameter '" + p.name +
                            "' is bound to a buffer, so it must be a device or constant pointer or "
                            "reference (e.g. constant uint &n [[buffer(2)]])");
            return false;
        }
        if (p.kind == CAMEL_SIM_PARAM_BUFFER && !space_buf) {
            error(line, "kernel parameter '" + p.name +
                            "': a [[buffer]] argument must be a pointer or reference in the device "
                            "or constant address space (MSL: buffers are device or constant), e.g. "
                            "device float *x [[buffer(0)]]");
            return false;
        }
        if (p.kind == CAMEL_SIM_PARAM_BUILTIN && !check_builtin_type(a, b, p, line)) return false;
        for (auto &at : attrs) {
            if (at.name != "function_constant") continue;
            // the specialiser (translate.cpp) has decided: true or false
            // "false,name,why" (why: false, zero or unset) for an argument left out
            std::string present = at.arg.substr(0, at.arg.find(','));
            if (present != "true" && present != "false") {
                error(line, "kernel parameter '" + p.name + "': [[function_constant(" + at.arg +
                                ")]] takes the name of a function constant");
                return false;
            }
            if (p.kind == CAMEL_SIM_PARAM_BUILTIN) {
                error(line, "kernel parameter '" + p.name + "': [[" + p.builtin +
                                "]] cannot be optional ([[function_constant]]) in " + shim +
                                "; declare it always, it costs nothing");
                return false;
            }
            p.absent = present == "false";
            if (p.absent && present.size() < at.arg.size()) {
                std::string rest = at.arg.substr(present.size() + 1);
                std::string why = rest.substr(rest.find(',') + 1);
                p.constant = "function constant '" + rest.substr(0, rest.find(',')) + "' " +
                             (why == "unset" ? "has no value" : why == "zero" ? "is 0" : "is false");
            }
        }
        p.position = (int)params.size();
        params.push_back(p);
        return true;
    }

    // The type of a builtin parameter (MSL, "Attributes for kernel function
    // input arguments"): uint or ushort, and for the grid/threadgroup positions
    // and sizes also uint2/3 or ushort2/3.
    bool check_builtin_type(size_t a, size_t b, const Param &p, int line) {
        std::string type;
        for (size_t j = a; j < b; j++) {
            if (is(j, "[") && is(j + 1, "[")) break;
            const std::string &x = txt(j);
            if (S(j).kind != IDENT || x == p.name || x == "const" || x == "thread") continue;
            type += (type.empty() ? "" : " ") + x;
        }
        const BuiltinInfo *bi = find_builtin(p.builtin);
        bool scalar = type == "uint" || type == "ushort" || type == "uint32_t" || type == "uint16_t" ||
                      type == "unsigned" || type == "unsigned int" || type == "unsigned short";
        bool vec = type == "uint2" || type == "uint3" || type == "ushort2" || type == "ushort3";
        if (scalar || (bi->vector && vec)) return true;
        error(line, "kernel parameter '" + p.name + "': [[" + p.builtin + "]] cannot be declared as '" +
                        type + "'; MSL declares it as " +
                        (bi->vector ? "uint, uint2, uint3, ushort, ushort2 or ushort3"
                                    : "uint or ushort (a scalar)"));
        return false;
    }

    // A '{' at j in a declaration opens a braced initialiser (`x{}`, `a[4]{}`), not a
    // class body (`struct { float v; } s`, `struct S { ... } s`).
    bool braced_init(size_t j) {
        auto tag = [&](size_t i) {
            return is(i, "struct") || is(i, "class") || is(i, "union") || is(i, "enum");
        };
        if (j < 2) return false;
        if (is(j - 1, "]")) return true;
        return S(j - 1).kind == IDENT && !tag(j - 1) && !tag(j - 2);
    }

    // threadgroup at k. In a function body at the start of a declaration that
    // declares storage (no * or &), it becomes a reference into the group's
    // threadgroup memory: threadgroup float tile[16][16];
    //   -> auto &tile = *__camel_tg<float[16][16]>();
    // An initialiser (`= {0}`, `{}`; MLX and Skia's SkSL ship them) sets no value:
    // it is dropped, and the variable starts as all threadgroup memory does (NaN).
    void threadgroup(size_t k, bool in_function, bool kernel_body) {
        bool stmt_start = k > 0 && (is(k - 1, ";") || is(k - 1, "{") || is(k - 1, "}"));
        auto blank = [&](size_t j) {  // the qualifier of a pointer or reference: erased (the
            if (target != TARGET_CHECK) this->blank(j);  // check keeps it)
        };
        if (!in_function || !stmt_start) {
            blank(k);
            return;
        }
        // find the end of the declaration
        size_t end = k + 1;
        int depth = 0;
        while (end < sig.size()) {
            const std::string &x = txt(end);
            if (x == "(" || x == "[" || x == "{") depth++;
            if (x == ")" || x == "]" || x == "}") depth--;
            if (x == ";" && depth == 0) break;
            end++;
        }
        // split into declarators at top-level commas; the type is what comes
        // before the first declarator's name. inits[d]: where declarator d's
        // initialiser (`= v`, `= {0}`, `{}`) begins, its end if it has none.
        std::vector<std::pair<size_t, size_t>> decls;
        std::vector<size_t> inits;
        size_t a = k + 1, init_at = 0;
        depth = 0;
        int angle = 0;
        for (size_t j = k + 1; j <= end; j++) {
            const std::string &x = txt(j);
            if (depth == 0 && angle <= 0 && !init_at && (x == "=" || (x == "{" && braced_init(j))))
                init_at = j;
            if (x == "(" || x == "[" || x == "{") depth++;
            if (x == ")" || x == "]" || x == "}") depth--;
            if (depth == 0 && x == "<") angle++;
            if (depth == 0 && x == ">") angle--;
            if (depth == 0 && x == ">>") angle -= 2;
            if (j == end || (x == "," && depth == 0 && angle <= 0)) {
                decls.push_back({a, j});
                inits.push_back(init_at ? init_at : j);
                a = j + 1;
                init_at = 0;
            }
            if (depth == 0 && angle <= 0 && !init_at && (x == "*" || x == "&")) {
                blank(k);  // a pointer or reference to threadgroup memory
                return;
            }
        }
        // first declarator: type tokens, then the name, then [dims], then {}
        size_t first_end = inits[0];
        size_t name_at = first_end;
        for (size_t j = k + 1; j < first_end; j++) {
            if (is(j, "{")) {  // a struct defined here: its members' [dims] are not the variable's
                j = match(j) - 1;
                continue;
            }
            if (is(j, "[")) {
                name_at = j;
                break;
            }
        }
        name_at--;  // the identifier before '[' (or before ';')
        if (name_at <= k || S(name_at).kind != IDENT) {
            blank(k);
            return;
        }
        if (!kernel_body)
            error_at(k, "threadgroup variable '" + txt(name_at) + "' declared in a helper function: "
                        "MSL allows threadgroup variables only in a kernel function's body; "
                        "declare it in the kernel and pass a threadgroup pointer");
        for (size_t j = k + 1; j < name_at; j++)
            if (is(j, "atomic_float") || (is(j, "atomic") && is(j + 1, "<") && is(j + 2, "float")))
                error_at(k, "threadgroup atomic_float '" + txt(name_at) + "': Metal supports "
                            "atomic_float in device memory only");
        if (target == TARGET_CUDA) {  // CUDA has the same thing: one allocation per declaration
            S(k).out = "__shared__";
            for (size_t d = 0; d < decls.size(); d++)  // CUDA rejects any __shared__ initialiser
                for (size_t j = inits[d]; j < decls[d].second; j++) S(j).out = "";
            tg_storage.push_back(k);
            return;
        }
        std::string type, text;
        size_t type_from = k + 1;
        // threadgroup struct { float a[4]; } s; (or struct P { ... } s;): the struct is
        // defined first, named if it has no name, and the variable takes that name
        for (size_t j = k + 1; j < name_at; j++) {
            if (!(is(j, "struct") || is(j, "class") || is(j, "union"))) continue;
            size_t open = is(j + 1, "{") ? j + 1 : (S(j + 1).kind == IDENT && is(j + 2, "{")) ? j + 2 : 0;
            if (!open || match(open) > name_at) break;
            std::string tag = open == j + 1 ? "__camel_tg_struct_" + std::to_string(k) : txt(j + 1);
            for (size_t m = type_from; m < j; m++) type += txt(m) + " ";  // const, ...
            text += txt(j) + " " + tag + " ";
            for (size_t m = open; m < match(open); m++) text += txt(m) + " ";
            text += "; ";
            type += tag + " ";
            type_from = match(open);
            break;
        }
        for (size_t j = type_from; j < name_at; j++) type += txt(j) + " ";
        for (size_t d = 0; d < decls.size(); d++) {
            size_t da = d == 0 ? name_at : decls[d].first, db = inits[d];
            std::string name = txt(da), dims;
            for (size_t j = da + 1; j < db; j++) dims += txt(j);
            text += "auto &" + name + " = *__camel_tg<" + (target == TARGET_CHECK ? "threadgroup " : "") +
                    type + dims + ">();";
        }
        // Replace k..end-1 (the ';' at end is dropped too: text has its own),
        // keeping the newlines in between so the lines stay put.
        S(k).out = text;
        for (size_t j = k + 1; j <= end && j < sig.size(); j++) S(j).out = "";
        tg_storage.push_back(k);
    }

    // ---- after the pass -------------------------------------------------
    // The rewritten text of sig tokens a..b-1 (address spaces blanked away).
    std::string out_text(size_t a, size_t b) {
        std::string r;
        for (size_t j = a; j < b && j < sig.size(); j++) {
            const std::string &o = S(j).out;
            if (o.find_first_not_of(' ') == std::string::npos) continue;
            r += o;
            r += ' ';
        }
        return r;
    }

    // Address-space overloads: float f(device float*) and float f(threadgroup float*),
    // a constructor per address space, or partial specialisations S<device T*> and
    // S<threadgroup T*> are one definition twice once address spaces are erased. A
    // later copy that is the same code is dropped (one flat memory runs it the same);
    // copies that differ cannot be told apart here, which is an error naming both.
    // The end of a function's header: past its parameter list and the qualifiers of a
    // member function's `this` (float get() const device), which are part of its type.
    size_t function_head_end(size_t paren_at, size_t open) {
        size_t j = match(paren_at);
        while (j < open && (is(j, "const") || is(j, "volatile") || is(j, "&") || is(j, "&&") ||
                            is_space(txt(j))))
            j++;
        return j;
    }

    void merge_address_space_overloads() {
        std::map<std::pair<size_t, std::string>, size_t> first;  // (scope, header) -> definition
        std::map<size_t, bool> spaced;                             // definition -> wrote a space
        for (size_t d = 0; d < definitions.size(); d++) {
            const Definition &df = definitions[d];
            size_t head_end = df.open;
            if (!df.is_class) {
                size_t paren_at = 0;
                function_name(df.stmt, df.open, &paren_at);
                if (!paren_at) continue;
                head_end = function_head_end(paren_at, df.open);
            } else {
                bool specialisation = false;
                for (size_t j = df.stmt; j < df.open; j++)
                    if ((is(j, "struct") || is(j, "class") || is(j, "union")) && is(j + 2, "<"))
                        specialisation = true;
                if (!specialisation) continue;
            }
            // only definitions that wrote an address space collide: one of the two (an
            // unqualified member function is thread, beside its device overload)
            bool spaces = false;
            for (size_t j = df.stmt; j < head_end; j++) spaces = spaces || is_space(txt(j));
            auto key = std::make_pair(df.parent, out_text(df.stmt, head_end));
            auto it = first.find(key);
            if (it == first.end()) {
                first[key] = d;
                spaced[d] = spaces;
                continue;
            }
            if (!spaces && !spaced[it->second]) continue;  // C++'s own redefinition
            const Definition &keep = definitions[it->second];
            size_t keep_head = keep.open;
            if (!keep.is_class) {
                size_t paren_at = 0;
                function_name(keep.stmt, keep.open, &paren_at);
                keep_head = function_head_end(paren_at, keep.open);
            }
            if (out_text(keep_head, keep.close + 1) == out_text(head_end, df.close + 1)) {
                blank_range(df.stmt, df.close + 1);
                if (df.is_class && is(df.close + 1, ";")) blank(df.close + 1);
            } else {
                error(S(df.stmt).line,
                      "this definition differs from the one at line " +
                          std::to_string(S(keep.stmt).line) + " only in address spaces, and "
                          "its body is different: " + shim + " has one address space, so it "
                          "cannot choose between them (make the bodies the same, or give the "
                          "overloads different names)");
            }
        }
    }

    // Recursion: a user function whose body calls a function of the same name.
    // Overloads (float4 relu(float4) calling float relu(float)) cannot be told
    // apart without types, so a name defined more than once is not checked;
    // nor is a qualified call (metal::dot inside a function named dot).
    void check_recursion() {
        for (auto &f : functions) {
            if (f.second.size() != 1) continue;
            for (auto &fi : f.second) {
                for (size_t j = fi.body_begin + 1; j < fi.body_end; j++) {
                    if (S(j).kind == IDENT && txt(j) == f.first && is(j + 1, "(") &&
                        !(j > 0 && (is(j - 1, ".") || is(j - 1, "->") || is(j - 1, "::")))) {
                        error_at(j, "function '" + f.first +
                                        "' calls itself; recursion is not supported by Metal");
                        break;
                    }
                }
            }
        }
    }

    // ---- address spaces (MSL 4: device, constant, threadgroup, thread) -----
    // The rewrite erases address spaces, so clang cannot see a mismatch. A
    // token-level check for the plain cases: a variable whose address space is
    // written in its declaration (a pointer or reference with device, constant,
    // threadgroup or thread; a local object, which is thread) passed as a bare
    // name, &name or name.member / name->member to a parameter of a user
    // function defined once (not a template, not overloaded) whose pointer or
    // reference names another address space, or used to initialise such a
    // pointer or reference. Expressions, templates and overloads are not checked.
    struct Var {
        std::string space;  // of what the name points or refers to, or of the object
        bool indirect;      // a pointer or reference (else an object)
        bool pointer;
    };
    static bool is_space(const std::string &x) {
        return x == "device" || x == "constant" || x == "threadgroup" || x == "thread";
    }

    // The end of the comma-separated item that starts at j in a list ending before
    // `close` (a parameter or an argument): the next top-level comma, or close.
    size_t item_end(size_t j, size_t close) {
        int depth = 0;
        while (j < close && !(depth == 0 && is(j, ","))) {
            if (is(j, "(") || is(j, "<") || is(j, "[")) depth++;
            if (is(j, ")") || is(j, ">") || is(j, "]")) depth--;
            j++;
        }
        return j;
    }

    // A declaration at sig index j: [space] [const|volatile]* type [*|&] name.
    // Returns the index of the name (0 if none) and fills v.
    size_t parse_decl(size_t j, size_t end, Var &v) {
        v = Var{"thread", false, false};
        bool explicit_space = false;
        size_t n = j;
        while (n < end && (is_space(txt(n)) || is(n, "const") || is(n, "volatile"))) {
            if (is_space(txt(n))) {
                v.space = txt(n);
                explicit_space = true;
            }
            n++;
        }
        if (n >= end || S(n).kind != IDENT) return 0;
        n++;  // the type
        while (n + 1 < end && is(n, "::") && S(n + 1).kind == IDENT) n += 2;
        if (is(n, "<")) {  // template arguments, within this statement (else a comparison)
            int d = 0;
            size_t m = n;
            for (; m < end; m++) {
                if (is(m, "<")) d++;
                if (is(m, ">")) d--;
                if (is(m, ">>")) d -= 2;
                if (is(m, ";") || is(m, "{") || is(m, "}") || is(m, "(") || is(m, ")") || d < 0)
                    return 0;
                if (d == 0) break;
            }
            if (m >= end) return 0;
            n = m + 1;
        }
        while (n < end && (is_space(txt(n)) || is(n, "const") || is(n, "volatile"))) {
            if (is_space(txt(n))) {
                v.space = txt(n);
                explicit_space = true;
            }
            n++;
        }
        if (is(n, "*") || is(n, "&")) {
            v.indirect = true;
            v.pointer = is(n, "*");
            n++;
            if (is(n, "*") || is(n, "&")) return 0;  // pointer to pointer: not checked
            while (is(n, "const") || is(n, "volatile")) n++;
            if (!explicit_space) return 0;  // a template or generic pointer: not checked
        } else if (explicit_space && v.space != "thread" && v.space != "threadgroup") {
            return 0;
        }
        if (n < end && S(n).kind == IDENT && (is(n + 1, ";") || is(n + 1, "=") || is(n + 1, ",") ||
                                              is(n + 1, ")") || is(n + 1, "[") || is(n + 1, "{"))) {
            if (is(n + 1, "[") && !is(n + 2, "[") && !v.indirect) {
                v.indirect = v.pointer = true;  // an array: its name is a pointer into its space
            }
            return n;
        }
        return 0;
    }

    // What an argument expression a..b refers to: the address space of the
    // memory it points or refers to, and whether it is a pointer value.
    bool arg_space(size_t a, size_t b, const std::map<std::string, Var> &vars, std::string &space,
                   bool &pointer) {
        bool addr = is(a, "&");
        if (addr) a++;
        if (a >= b || S(a).kind != IDENT) return false;
        auto it = vars.find(txt(a));
        if (it == vars.end()) return false;
        const Var &v = it->second;
        if (a + 1 == b) {  // name
            space = v.space;
            pointer = addr || v.pointer;
            return !(addr && v.pointer);  // &p: a pointer to a pointer, not checked
        }
        if (a + 3 == b && (is(a + 1, ".") || is(a + 1, "->")) && S(a + 2).kind == IDENT) {
            if (is(a + 1, "->") != v.pointer) return false;
            space = v.space;  // a member lives where its object lives
            pointer = addr;
            return true;
        }
        return false;
    }

    void mismatch(size_t at, const std::string &what, const std::string &from, const std::string &to) {
        error_at(at, what + ": cannot convert " + from + " memory to " + to + " (MSL 4: pointers and "
                     "references keep their address space; device, constant, threadgroup and "
                     "thread memory do not convert into one another)");
    }

    void check_address_spaces() {
        // parameters of the functions defined once, not templates
        std::map<std::string, std::vector<Var>> sigs;
        std::map<std::string, std::vector<bool>> checked;  // per parameter: has an explicit space
        std::map<std::string, size_t> params_at;
        for (auto &f : functions) {
            if (f.second.size() != 1) continue;
            const FunctionInfo &fi = f.second[0];
            if (is(fi.stmt, "template")) continue;
            size_t close = fi.body_begin;
            while (close > fi.stmt && !is(close, ")")) close--;
            if (!is(close, ")")) continue;
            size_t open = close;
            int depth = 0;
            for (; open > fi.stmt; open--) {
                if (is(open, ")")) depth++;
                if (is(open, "(")) depth--;
                if (depth == 0) break;
            }
            if (!is(open, "(") || S(open - 1).kind != IDENT || txt(open - 1) != f.first) continue;
            params_at[f.first] = open;
            std::vector<Var> ps;
            std::vector<bool> ok;
            size_t j = open + 1;
            while (j < close) {
                size_t e = item_end(j, close);
                Var v;
                size_t name = parse_decl(j, e + 1, v);
                ps.push_back(v);
                ok.push_back(name != 0 && v.indirect);
                j = e + 1;
            }
            sigs[f.first] = ps;
            checked[f.first] = ok;
        }
        for (auto &f : functions) {
            for (auto &fi : f.second) {
                std::map<std::string, Var> vars;
                auto pa = params_at.find(f.first);
                if (pa != params_at.end() && f.second.size() == 1) {
                    size_t open = pa->second, close = match(open) - 1, j = open + 1;
                    while (j < close) {  // the function's own parameters
                        size_t e = item_end(j, close);
                        Var v;
                        size_t name = parse_decl(j, e + 1, v);
                        if (name && (v.indirect || v.space == "thread")) vars[txt(name)] = v;
                        j = e + 1;
                    }
                }
                for (size_t j = fi.body_begin + 1; j < fi.body_end; j++) {
                    bool start = is(j - 1, ";") || is(j - 1, "{") || is(j - 1, "}") || is(j - 1, "(");
                    if (start && S(j).kind == IDENT && !is(j, "return") && !is(j, "else") &&
                        !is(j, "case") && !is(j, "typedef") && !is(j, "using")) {
                        Var v;
                        size_t name = parse_decl(j, fi.body_end, v);
                        if (name) {
                            vars[txt(name)] = v;
                            if (v.indirect && is(name + 1, "=")) {  // T *p = q;  T &r = x.m;
                                size_t e = name + 2;
                                while (e < fi.body_end && !is(e, ";") && !is(e, ",")) e++;
                                std::string sp;
                                bool ptr = false;
                                if (arg_space(name + 2, e, vars, sp, ptr) && ptr == v.pointer &&
                                    sp != v.space)
                                    mismatch(name, "'" + txt(name) + "'", sp, v.space);
                            }
                        }
                    }
                    // a call of a user function: f(a, b)
                    if (S(j).kind != IDENT || !is(j + 1, "(") || (j > 0 && (is(j - 1, ".") ||
                        is(j - 1, "->") || is(j - 1, "::"))))
                        continue;
                    auto sg = sigs.find(txt(j));
                    if (sg == sigs.end()) continue;
                    size_t close = match(j + 1) - 1, a = j + 2;
                    for (size_t i = 0; a <= close && i < sg->second.size(); i++) {
                        size_t e = item_end(a, close);
                        const Var &p = sg->second[i];
                        std::string sp;
                        bool ptr = false;
                        if (checked[txt(j)][i] && arg_space(a, e, vars, sp, ptr) && ptr == p.pointer &&
                            sp != p.space)
                            mismatch(a, "argument " + std::to_string(i + 1) + " of '" + txt(j) + "'",
                                     sp, p.space);
                        a = e + 1;
                    }
                }
            }
        }
    }

    // Does a function (by name) reach a barrier or a SIMD-group op (fibers),
    // or declare threadgroup variables (tg), directly or through other user
    // functions? Both need the runtime's view of the current thread.
    enum { USES_FIBER_OP, USES_TG_VARS, USES_BARRIER, USES_SIMD, USES_ASSERT };
    static bool is_barrier(const std::string &id) { return id == "threadgroup_barrier"; }
    static bool is_simd_op(const std::string &id) { return is_fiber_op(id) && !is_barrier(id); }
    std::map<std::string, bool> memo[5];
    bool uses(const std::string &name, int want, std::set<std::string> &visiting) {
        bool want_tg = want == USES_TG_VARS;
        auto m = memo[want].find(name);
        if (m != memo[want].end()) return m->second;
        if (visiting.count(name)) return false;
        visiting.insert(name);
        bool found = false;
        auto it = functions.find(name);
        if (it != functions.end()) {
            for (auto &fi : it->second) {
                for (size_t j = fi.body_begin + 1; j < fi.body_end && !found; j++) {
                    if (S(j).kind != IDENT) continue;
                    const std::string &x = txt(j);
                    // (CUDA's flags count calls only: a variable named simd_group is no SIMD op)
                    bool call = is(j + 1, "(") || is(j + 1, "<");
                    bool op = want == USES_FIBER_OP ? is_fiber_op(x)
                              : want == USES_BARRIER ? is_barrier(x) && call
                              : want == USES_SIMD    ? is_simd_op(x) && call
                              : want == USES_ASSERT  ? x == "__camel_assert_failed"  // assert()
                                                     : false;
                    if (op) found = true;
                    else if (x != name && functions.count(x) && uses(x, want, visiting)) found = true;
                }
                if (want_tg)
                    for (size_t k : tg_storage)
                        if (k > fi.body_begin && k < fi.body_end) found = true;
            }
        }
        visiting.erase(name);
        memo[want][name] = found;
        return found;
    }
    bool uses_op(const std::string &name, int want) {
        std::set<std::string> visiting;
        return uses(name, want, visiting);
    }
    bool uses_fibers(const std::string &name) { return uses_op(name, USES_FIBER_OP); }
    bool uses_threadgroup_vars(const std::string &name) { return uses_op(name, USES_TG_VARS); }
    // The runtime's view of the current thread (__camel_cur): barriers, SIMD-group
    // functions, threadgroup variables, and a failing assert() (which names the thread).
    bool needs_current_thread(const std::string &name) {
        return uses_fibers(name) || uses_threadgroup_vars(name) || uses_op(name, USES_ASSERT);
    }

    // ---- MSL 4.0's implicit thread (the typed check only) ----------------
    // Before MSL 4.1's generic pointers, a pointer or reference whose declaration
    // names no address space points into thread memory, and so does `this` of a
    // member function without an address-space qualifier (Apple's compiler: "address
    // space mismatch in 'this' argument"; MLX #3963: "implicitly thread" before 4.1).
    // C++ for OpenCL makes both __generic, which takes every space, so the check
    // writes `thread` where the user's code wrote none: before the type of a `*` or
    // `&` declarator whose type is a scalar, vector or matrix of MSL's, a struct of the
    // user's or an alias of one (not a template parameter, `auto` or a template-id, whose
    // space the argument may give), and after the parameter list of a member function
    // defined in its class (not a constructor, destructor or static member). A
    // constructor's parameters are left as written.
    std::set<std::string> class_names, scalar_aliases;

    static bool is_msl_scalar(const std::string &x) {
        static const std::set<std::string> names = {
            "bool", "char", "uchar", "short", "ushort", "int", "uint", "long", "ulong",
            "half", "float", "bfloat", "void", "size_t", "ptrdiff_t", "unsigned", "signed",
            "int8_t", "uint8_t", "int16_t", "uint16_t", "int32_t", "uint32_t", "int64_t",
            "uint64_t"};
        if (names.count(x)) return true;
        // float4x4, half2x3: matrices
        for (const char *b : {"float", "half"}) {
            size_t n = strlen(b);
            if (x.size() == n + 3 && x.compare(0, n, b) == 0 && x[n] >= '2' && x[n] <= '4' &&
                x[n + 1] == 'x' && x[n + 2] >= '2' && x[n + 2] <= '4')
                return true;
        }
        return false;
    }
    bool names_plain_type(const std::string &x) {
        return is_msl_scalar(x) || names_vector_type(x) || class_names.count(x) ||
               scalar_aliases.count(x);
    }

    void implicit_thread() {
        // the user's struct, class and union names, and aliases of plain types
        for (size_t k = 0; k + 1 < sig.size(); k++) {
            if (!S(k).user) continue;
            if ((is(k, "struct") || is(k, "class") || is(k, "union")) && S(k + 1).kind == IDENT &&
                !type_params.count(txt(k + 1)))
                class_names.insert(txt(k + 1));
        }
        for (size_t k = 0; k + 3 < sig.size(); k++) {
            if (!S(k).user) continue;
            if (is(k, "typedef") && names_plain_type(txt(k + 1)) && S(k + 2).kind == IDENT &&
                is(k + 3, ";"))
                scalar_aliases.insert(txt(k + 2));
            if (is(k, "using") && S(k + 1).kind == IDENT && is(k + 2, "=") &&
                names_plain_type(txt(k + 3)) && is(k + 4, ";"))
                scalar_aliases.insert(txt(k + 1));
        }
        std::vector<std::pair<size_t, size_t>> ctor_params;  // [open, close) of constructors'
        for (const Definition &df : definitions) {
            if (df.is_class || df.parent == (size_t)-1 || !S(df.stmt).user) continue;
            bool in_class = false;
            for (const Definition &c : definitions)
                if (c.is_class && c.open == df.parent) in_class = true;
            if (!in_class) continue;
            // the declarator's '(' at depth 0
            size_t j = df.stmt, open = 0;
            bool is_static = false;
            while (j < df.open) {
                if (is(j, "template") && is(j + 1, "<")) {
                    j = match(j + 1);
                    continue;
                }
                if (is(j, "[") && is(j + 1, "[")) {
                    j = match(j);
                    continue;
                }
                if (is(j, "static") || is(j, "friend")) is_static = true;
                if ((is(j, "__attribute__") || is(j, "decltype") || is(j, "alignas")) &&
                    is(j + 1, "(")) {
                    j = match(j + 1);
                    continue;
                }
                if (is(j, "(")) {
                    open = j;
                    break;
                }
                j++;
            }
            if (!open) continue;
            if (is(open - 1, "operator") && is(open + 1, ")") && is(open + 2, "(")) open += 2;
            size_t close = match(open);  // past ')'
            const std::string &name = txt(open - 1);
            bool ctor = !is(open - 2, "operator") && (class_names.count(name) || is(open - 2, "~"));
            if (ctor) {
                ctor_params.push_back({open, close});
                continue;
            }
            if (is_static) continue;
            bool spaced = false;
            for (size_t m = close; m < df.open; m++)
                if (is_space(txt(m))) spaced = true;
            if (!spaced) S(close - 1).out += " thread";
        }
        for (size_t k = 1; k + 1 < sig.size(); k++) {
            if (!S(k).user || !(is(k, "*") || is(k, "&"))) continue;
            bool in_ctor = false;
            for (auto &r : ctor_params)
                if (k > r.first && k < r.second) in_ctor = true;
            if (in_ctor) continue;
            // what follows a declarator's * or &
            const std::string &nx = txt(k + 1);
            if (!(S(k + 1).kind == IDENT || nx == ")" || nx == "," || nx == ">" || nx == "*" ||
                  nx == "&"))
                continue;
            if (is_space(nx)) continue;  // device float* thread* p: the pointer's own space
            size_t j = k - 1;
            while (j > 0 && (is(j, "const") || is(j, "volatile"))) j--;
            if (!names_plain_type(txt(j)) || type_params.count(txt(j))) continue;
            size_t first = j;
            while (first >= 2 && is(first - 1, "::") && S(first - 2).kind == IDENT) first -= 2;
            // the rest of the declaration's specifiers: any space there?
            size_t b = first;
            bool spaced = false;
            while (b > 0) {
                const std::string &w = txt(b - 1);
                if (is_space(w)) spaced = true;
                else if (!(w == "const" || w == "volatile" || w == "static" || w == "constexpr" ||
                           w == "inline" || w == "unsigned" || w == "signed" || w == "long" ||
                           w == "short" || w == "typename"))
                    break;
                b--;
            }
            if (spaced || b == 0) continue;
            const std::string &before = txt(b - 1);
            if (!(before == "(" || before == "," || before == ";" || before == "{" ||
                  before == "}" || before == "<" || before == ":" || before == ">" ||
                  before == "]" || before == "=" || before == "typedef" || before == ")"))
                continue;
            // ")", ">", "]": after __attribute__((...)), template <...> or [[...]] (an
            // expression has no type name right before its `*` or `&`)
            S(first).out = "thread " + S(first).out;
        }
    }

    // ---- generated code -------------------------------------------------
    // Parameters without an explicit [[buffer(i)]] / [[threadgroup(i)]] get the first
    // index that no parameter of the kernel writes, in parameter order (MSL 4, 5.2.1: "the
    // Metal compiler assigns them using the first available location index"; its example
    // gives `device myUserInfo *u` buffer 0 beside `device float *f [[buffer(10)]]`).
    // Optional arguments count as written whether or not this specialisation declares
    // them, so the numbering does not change with the constants' values (the
    // specification does not say; Apple numbers at library compile, before specialising).
    // Metal's limits: 31 slots, each bound once per kernel.
    void assign_indices(Kernel &kn) {
        std::set<int> taken_buffer, taken_tg;
        for (auto &p : kn.params) {
            if (p.kind == CAMEL_SIM_PARAM_BUFFER && p.index >= 0) taken_buffer.insert(p.index);
            if (p.kind == CAMEL_SIM_PARAM_THREADGROUP && p.index >= 0) taken_tg.insert(p.index);
        }
        auto first_free = [](std::set<int> &taken) {
            int i = 0;
            while (taken.count(i)) i++;
            taken.insert(i);
            return i;
        };
        for (auto &p : kn.params) {
            if (p.kind == CAMEL_SIM_PARAM_BUFFER && p.index < 0) p.index = first_free(taken_buffer);
            if (p.kind == CAMEL_SIM_PARAM_THREADGROUP && p.index < 0) p.index = first_free(taken_tg);
        }
        std::map<std::pair<int, int>, std::string> used;
        for (auto &p : kn.params) {
            if (p.kind == CAMEL_SIM_PARAM_BUILTIN || p.absent) continue;
            const char *what = p.kind == CAMEL_SIM_PARAM_BUFFER ? "buffer" : "threadgroup";
            if (p.index > 30)
                error(kn.line, "kernel '" + kn.host_name + "' parameter '" + p.name + "': [[" +
                                   what + "(" + std::to_string(p.index) +
                                   ")]] is out of range; Metal has slots 0 to 30");
            auto slot = std::make_pair(p.kind, p.index);
            if (used.count(slot))
                error(kn.line, "kernel '" + kn.host_name + "': parameters '" + used[slot] +
                                   "' and '" + p.name + "' are both [[" + what + "(" +
                                   std::to_string(p.index) + ")]]");
            used[slot] = p.name;
        }
    }

    // The argument expression that binds parameter p (type P) in a wrapper.
    std::string bind_arg(const Param &p, const std::string &P, const std::string &buffer,
                         const std::string &tg, const std::string &thread) {
        std::string i = std::to_string(p.index);
        if (p.absent)  // an address that faults, naming the parameter (the simulator), or null
            return "__camel_bind<" + P + ">(__camel_absent_argument(" + std::to_string(p.position) + "))";
        if (p.kind == CAMEL_SIM_PARAM_BUFFER) return "__camel_bind<" + P + ">(" + buffer + "[" + i + "])";
        if (p.kind == CAMEL_SIM_PARAM_THREADGROUP) return "__camel_bind<" + P + ">(" + tg + "[" + i + "])";
        const BuiltinInfo *bi = find_builtin(p.builtin);
        if (!bi->field) return "__camel_builtin3<" + P + ">(__camel_zero3)";
        if (bi->vector) return "__camel_builtin3<" + P + ">(" + thread + bi->field + ")";
        return "__camel_builtin1<" + P + ">(" + thread + bi->field + ")";
    }

    // CUDA: one __global__ wrapper per kernel, and the description lines
    // (both formats in shim/cuda/cuda_abi.h).
    std::string generate_cuda(std::string &desc) {
        std::string g = "\n#pragma clang force_cuda_host_device end\n";
        g += "\n#line 1 \"<camel generated>\"\n";
        g += "// Entry wrappers (shim/cuda/cuda_abi.h): Metal's builtins from the block and\n"
             "// camel_cuda_args; [[buffer(i)]] is args.buffers[i], [[threadgroup(i)]] the\n"
             "// dynamic shared memory at args.threadgroup_offset[i].\n";
        g += "static __device__ const uint32_t __camel_zero3[3] = {0, 0, 0};\n";
        std::set<std::string> names;
        int count = 0;
        for (size_t i = 0; i < kernels.size(); i++) {
            Kernel &kn = kernels[i];
            if (!names.insert(kn.host_name).second) {
                error(kn.line, "two kernels are named '" + kn.host_name + "'");
                continue;
            }
            if (skipped(kn)) continue;
            assign_indices(kn);
            // [[host_name("flash_v" "1" "_d32")]] after macro expansion: the simulator
            // writes the name into C++, which joins the literals; here we join them
            std::string host;
            for (char ch : kn.host_name)
                if (ch != '"') host += ch;
            std::string fn = "::" + kn.qualified + kn.targs;  // ::matrix, not metal::matrix
            std::string F = "decltype(" + fn + ")";
            std::string n = std::to_string(count++);
            bool barrier = uses_op(kn.body_owner, USES_BARRIER);
            bool simd = uses_op(kn.body_owner, USES_SIMD);
            // The entry carries the kernel's name, so ncu and compute-sanitizer reports say
            // "camel_matmul_v10_simdgroup", not a number (a name C cannot spell: a number).
            bool plain = !host.empty() && !isdigit((unsigned char)host[0]);
            for (char ch : host) plain = plain && (isalnum((unsigned char)ch) || ch == '_');
            std::string entry = plain ? "camel_" + host : "camel_kernel_" + n;
            desc += "kernel " + n + " " + host + " " + (barrier ? "1" : "0") + " " +
                    (simd ? "1" : "0") + " " + entry + "\n";
            g += "\n// kernel " + n + ": " + host + (host != fn ? " (" + fn + ")" : std::string()) + "\n";
            g += "extern \"C\" __global__ void " + entry + "(camel_cuda_args args) {\n";
            g += "    const __camel_thread t = __camel_thread_of(args);\n";
            g += "    (void)t;\n";
            // inlined, so the kernel's loops are unrolled and its arrays kept in
            // registers within the entry (a called function gets neither for big bodies)
            g += "    [[clang::always_inline]] " + fn + "(";
            std::string sizes;
            for (size_t j = 0; j < kn.params.size(); j++) {
                const Param &p = kn.params[j];
                std::string P = "__camel_param_t<" + std::to_string(j) + ", " + F + ">";
                g += std::string(j ? "," : "") + "\n        " +
                     bind_arg(p, P, "args.buffers", "__camel_threadgroup_memory + args.threadgroup_offset", "t.");
                bool by_value = p.kind == CAMEL_SIM_PARAM_BUFFER && !p.pointer;
                sizes += std::string(j ? ", " : "") +
                         (by_value ? "(uint32_t)sizeof(__camel_remove_ref_t<" + P + ">)" : "0");
                int index = p.kind == CAMEL_SIM_PARAM_BUILTIN ? -1 : p.index;
                std::string name = p.name.empty() ? "-" : p.name;
                int kind = p.absent ? CAMEL_SIM_PARAM_ABSENT : p.kind;
                desc += "param " + n + " " + std::to_string(j) + " " + name + " " +
                        std::to_string(kind) + " " + std::to_string(index) + " " +
                        (p.pointer ? "1" : "0") + "\n";
            }
            g += ");\n}\n";
            // sizes of the parameters bound by value or reference, for setBytes checks
            g += "extern \"C\" __device__ const uint32_t camel_kernel_" + n + "_value_sizes[" +
                 std::to_string(kn.params.empty() ? 1 : kn.params.size()) + "] = {" +
                 (kn.params.empty() ? std::string("0") : sizes) + "};\n";
        }
        return g;
    }

    // A builtin that differs between the threads of a group, as an expression of the
    // group entry's loop variables x, y, z (position in the group) and i (linear index);
    // "" for one that every thread of the group shares.
    // (`v` prefixes the names: "" in group entries, "__camel_" in region functions, where
    // the kernel's own code shares the scope.)
    static std::string varying_builtin(const BuiltinInfo *bi, const std::string &P,
                                       const std::string &v = "") {
        std::string f = bi->field ? bi->field : "";
        std::string x = v + "x", y = v + "y", z = v + "z", i = v + "i";
        if (f == "thread_position_in_grid")
            return "__camel_xyz<" + P + ">(" + v + "ox + " + x + ", " + v + "oy + " + y + ", " + v +
                   "oz + " + z + ")";
        if (f == "thread_position_in_threadgroup")
            return "__camel_xyz<" + P + ">(" + x + ", " + y + ", " + z + ")";
        if (f == "thread_index_in_threadgroup") return "(" + P + ")" + i;
        if (f == "thread_index_in_simdgroup") return "(" + P + ")(" + i + " % 32u)";
        if (f == "simdgroup_index_in_threadgroup") return "(" + P + ")(" + i + " / 32u)";
        if (f == "thread_index_in_quadgroup") return "(" + P + ")(" + i + " % 4u)";
        if (f == "quadgroup_index_in_threadgroup") return "(" + P + ")(" + i + " / 4u)";
        return "";
    }

    // ---- barrier regions (the simulator only) -------------------------------
    // A kernel whose barriers all sit at the top level of its body, or at the top level
    // of `for` loops there, runs a threadgroup as PoCL does: the code between two
    // barriers (a region) is a loop over the threads, and a barrier is where one loop
    // ends and the next begins. What one thread keeps across a barrier (a local declared
    // in one region and used in another) lives in an array indexed by the thread. A
    // loop around barriers is entered when every thread's condition holds; when only
    // some threads' does, that is the error the fibers report as a partial barrier.
    // A loop around barriers must end or begin with one (its back edge acts as one), and
    // nowhere else may a region boundary with no barrier of the kernel's (a loop's entry
    // or exit) hide a race through shared memory: walk_pieces.
    // Anything else (a barrier under an `if`, `return`, `break`, a SIMD-group function,
    // a template kernel, a parameter the kernel assigns to, ...) keeps the fibers.
    struct RItem {
        enum Kind { STMT, BARRIER, LOOP } kind = STMT;
        size_t a = 0, b = 0;  // sig range of the statement (past its ';' or '}')
        size_t init_a = 0, init_b = 0, cond_a = 0, cond_b = 0, incr_a = 0, incr_b = 0;
        std::vector<RItem> body;
        int line = 0;  // LOOP: line of its first barrier
    };
    struct RDecl {  // one declarator of a local declaration
        std::string qual, type, ptrs, name, dims;  // qual: "const " or "constexpr "
        size_t init_a = 0, init_b = 0;  // sig range of the initialiser, empty if none
    };

    // Index past the statement starting at j (npos if it does not end before b).
    size_t stmt_end(size_t j, size_t b) {
        const size_t npos = std::string::npos;
        if (j >= b) return npos;
        if (is(j, "{")) return match(j);
        if (is(j, ";")) return j + 1;
        if (is(j, "if")) {
            if (!is(j + 1, "(")) return npos;
            size_t k = stmt_end(match(j + 1), b);
            if (k != npos && k < b && is(k, "else")) k = stmt_end(k + 1, b);
            return k;
        }
        if (is(j, "for") || is(j, "while") || is(j, "switch")) {
            if (!is(j + 1, "(")) return npos;
            return stmt_end(match(j + 1), b);
        }
        if (is(j, "do")) {
            size_t k = stmt_end(j + 1, b);
            if (k == npos || !is(k, "while") || !is(k + 1, "(")) return npos;
            k = match(k + 1);
            return is(k, ";") ? k + 1 : npos;
        }
        for (size_t k = j; k < b; k++) {
            if (is(k, "(") || is(k, "[") || is(k, "{")) {
                k = match(k) - 1;
            } else if (is(k, ";")) {
                return k + 1;
            }
        }
        return npos;
    }

    bool has_barrier(size_t a, size_t b) {
        for (size_t k = a; k < b; k++)
            if (is(k, "threadgroup_barrier")) return true;
        return false;
    }

    bool parse_regions(size_t a, size_t b, std::vector<RItem> &out, bool top,
                       const std::set<size_t> &tg_decls) {
        for (size_t j = a; j < b;) {
            size_t e = stmt_end(j, b);
            if (e == std::string::npos || e > b) return false;
            RItem it;
            it.a = j;
            it.b = e;
            it.line = S(j).line;
            if (tg_decls.count(j) && !top) return false;
            if (is(j, "threadgroup_barrier")) {
                if (!is(j + 1, "(") || match(j + 1) + 1 != e) return false;
                it.kind = RItem::BARRIER;
            } else if (is(j, "for") && has_barrier(j, e)) {
                size_t open = j + 1, close = match(open) - 1, s1 = 0, s2 = 0;
                for (size_t k = open + 1; k < close; k++) {
                    if (is(k, "(") || is(k, "[") || is(k, "{")) k = match(k) - 1;
                    else if (is(k, ";")) (s1 ? s2 : s1) = k;
                }
                if (!s1 || !s2 || s2 == s1 + 1 || !is(close + 1, "{") || match(close + 1) != e)
                    return false;  // for (;;) needs a break; a body without braces
                it.kind = RItem::LOOP;
                it.init_a = open + 1, it.init_b = s1 + 1;  // with its ';'
                it.cond_a = s1 + 1, it.cond_b = s2;
                it.incr_a = s2 + 1, it.incr_b = close;
                if (has_barrier(it.init_a, it.incr_b)) return false;
                if (!parse_regions(close + 2, e - 1, it.body, false, tg_decls)) return false;
                for (auto &x : it.body)
                    if (x.kind == RItem::BARRIER && !it.line) it.line = x.line;
                if (!it.line) it.line = it.body.empty() ? 0 : it.body[0].line;
                for (size_t k = close + 2; k < e - 1; k++)  // breaks and continues that
                    if (is(k, "break") || is(k, "continue")) return false;  // bind to it
                // Every thread finishes an iteration before any starts the next one, so
                // the loop's back edge acts as a barrier. Unless the body ends or begins
                // with one, that barrier is not in the code, and a race across the back
                // edge (the next iteration's writes against this one's reads: v6-v9
                // without their second barrier) would be hidden: the fibers run such a loop.
                if (it.body.empty() || (it.body.back().kind != RItem::BARRIER &&
                                        it.body.front().kind != RItem::BARRIER))
                    return false;
            } else if (has_barrier(j, e)) {
                return false;  // under an if, a while, a block, ...
            }
            out.push_back(it);
            j = e;
        }
        return true;
    }

    // A local declaration `T a = x, *b, c[4];` in [a, b) (b past the ';'): 1 (out holds
    // its declarators), 0 (not a declaration: an expression, a call, a loop, ...) or -1 (a
    // declaration this parser does not take apart: references, T x(1), T x{1}, ...).
    int parse_local_decl(size_t a, size_t b, std::vector<RDecl> &out, bool &is_const,
                         bool &is_constexpr) {
        size_t j = a;
        is_const = is_constexpr = false;
        while (is(j, "const") || is(j, "constexpr")) {
            (is(j, "const") ? is_const : is_constexpr) = true;
            j++;
        }
        static const std::set<std::string> keywords = {
            "return", "if", "for", "while", "do", "switch", "case", "default", "break",
            "continue", "else", "sizeof", "threadgroup_barrier", "goto"};
        if (j >= b || S(j).kind != IDENT || keywords.count(txt(j))) return is_const || is_constexpr ? -1 : 0;
        // The type and the first name: identifiers, ::, template arguments and *s up to
        // the first = , ; or [. Two names in a row make it a declaration.
        size_t type_a = j, k = j;
        bool decl = false;
        while (k < b && (S(k).kind == IDENT || is(k, "::") || is(k, "*") || is(k, "&") || is(k, "<"))) {
            if (k > type_a && S(k).kind == IDENT && (S(k - 1).kind == IDENT || is(k - 1, "*") ||
                                                     is(k - 1, "&") || is(k - 1, ">")))
                decl = true;
            k = is(k, "<") ? match(k) : k + 1;
        }
        if (!decl) return is_const || is_constexpr ? -1 : 0;
        size_t name_at = k - 1;
        if (S(name_at).kind != IDENT) return -1;
        size_t type_b = name_at;
        while (type_b > type_a && is(type_b - 1, "*")) type_b--;
        std::string type;
        for (size_t q = type_a; q < type_b; q++) {
            if (is(q, "&") || is(q, "auto")) return -1;
            std::string o = S(q).out;
            if (o.find_first_not_of(' ') == std::string::npos) continue;  // device, thread, ...
            type += (type.empty() ? "" : " ") + o;
        }
        if (type.empty()) return -1;
        j = type_b;
        for (;;) {
            RDecl d;
            d.qual = is_constexpr ? "constexpr " : is_const ? "const " : "";
            d.type = type;
            while (is(j, "*")) {
                d.ptrs += "*";
                j++;
            }
            if (j >= b || S(j).kind != IDENT) return -1;
            d.name = txt(j++);
            while (is(j, "[")) {
                size_t e = match(j);
                for (size_t q = j; q < e; q++) d.dims += S(q).out;
                j = e;
            }
            if (is(j, "=")) {
                d.init_a = ++j;
                while (j < b && !is(j, ",") && !is(j, ";")) {
                    if (is(j, "(") || is(j, "[") || is(j, "{")) j = match(j);
                    else j++;
                }
                d.init_b = j;
            } else if (!is(j, ",") && !is(j, ";")) {
                return -1;  // T x(1); T x{1}; ...
            }
            out.push_back(d);
            if (is(j, ";")) return j + 1 == b ? 1 : -1;
            j++;  // ','
        }
    }

    bool is_assign_op(size_t k) {
        static const std::set<std::string> ops = {"=",  "+=", "-=", "*=",  "/=",  "%=", "&=",
                                                  "|=", "^=", "<<=", ">>=", "++", "--"};
        return k < sig.size() && ops.count(txt(k));
    }

    // Is the name at k assigned to, incremented or has its address taken (k: its use)?
    // `parts`: also through its components (a builtin's gid.x = ...); a pointer's
    // p[i] = ... writes memory, not the pointer.
    bool modified_at(size_t k, size_t end, bool parts) {
        if (k > 0 && (is(k - 1, "++") || is(k - 1, "--") || is(k - 1, "&"))) return true;
        size_t j = k + 1;
        while (parts) {  // name.x, name[i], name->y
            if (j < end && (is(j, ".") || is(j, "->")) && j + 1 < end && S(j + 1).kind == IDENT) {
                j += 2;
            } else if (j < end && is(j, "[")) {
                j = match(j);
            } else {
                break;
            }
        }
        return is_assign_op(j);
    }

    struct RegionGen {
        std::map<std::string, int> region_of_decl;   // local name -> the region declaring it
        std::map<std::string, std::set<int>> used_in;  // local name -> regions using it
        std::map<std::string, RDecl> decls;
        std::set<std::string> hoisted, group_consts;
        // Loops around barriers that every thread runs alike (by the loop's start): see
        // uniform_loop. Their variables (uniform_vars) are one per group, not per thread.
        std::set<size_t> uniform_loops;
        std::set<std::string> uniform_vars;
        std::map<size_t, std::vector<RDecl>> decl_at;  // statement start -> its declarators
        std::map<size_t, bool> decl_const;
        std::set<size_t> tg;  // threadgroup variable declarations (at group scope)
        int region = 0;
        bool ok = true;
    };

    // First walk: number the regions, find the declarations and where names are used.
    void region_scan(const std::vector<RItem> &items, RegionGen &rg, const std::set<size_t> &tg,
                     const std::set<std::string> &params) {
        auto note_uses = [&](size_t a, size_t b) {
            for (size_t k = a; k < b; k++)
                if (S(k).kind == IDENT && !(k > 0 && (is(k - 1, ".") || is(k - 1, "->") ||
                                                     is(k - 1, "::"))))
                    rg.used_in[txt(k)].insert(rg.region);
        };
        auto stmt = [&](size_t a, size_t b) {
            std::vector<RDecl> ds;
            bool c = false, ce = false;
            int kind = tg.count(a) ? 0 : parse_local_decl(a, b, ds, c, ce);
            if (kind < 0) rg.ok = false;
            if (kind > 0) {
                for (auto &d : ds) {
                    if (rg.decls.count(d.name) || params.count(d.name)) rg.ok = false;
                    rg.decls[d.name] = d;
                    rg.region_of_decl[d.name] = rg.region;
                    // constexpr is the same for every thread; so is a const of constants
                    bool constant = (c || ce) && d.dims.empty() && d.ptrs.empty();
                    for (size_t k = d.init_a; k < d.init_b && !ce; k++)
                        if (S(k).kind == IDENT && !rg.group_consts.count(txt(k))) constant = false;
                    if (constant && d.init_a < d.init_b) rg.group_consts.insert(d.name);
                }
                rg.decl_at[a] = ds;
                rg.decl_const[a] = c || ce;
                for (auto &d : ds) note_uses(d.init_a, d.init_b);
                for (auto &d : ds) rg.used_in[d.name].insert(rg.region);
            } else {
                note_uses(a, b);
            }
        };
        for (auto &it : items) {
            if (it.kind == RItem::STMT) {
                stmt(it.a, it.b);
            } else if (it.kind == RItem::BARRIER) {
                rg.region++;
            } else {
                rg.region++;
                stmt(it.init_a, it.init_b);
                uniform_loop(it, rg);
                rg.region++;
                note_uses(it.cond_a, it.cond_b);
                rg.region++;
                region_scan(it.body, rg, tg, params);
                rg.region++;
                note_uses(it.incr_a, it.incr_b);
                rg.region++;
            }
        }
    }

    // A loop around a barrier whose trip is the same for every thread, as row_sum's tree
    // `for (uint k = 128; k > 0; k >>= 1)`: one variable declared in its init from
    // constants, a condition and an increment of that variable and constants, the variable
    // not written in the body. It runs as a plain loop around its regions, with one k for
    // the group: no per-thread copy of k, no condition evaluated by every thread (all
    // threads agree by construction, so there is no divergence to report).
    void uniform_loop(const RItem &it, RegionGen &rg) {
        auto d = rg.decl_at.find(it.init_a);
        if (d == rg.decl_at.end() || d->second.size() != 1) return;
        const RDecl &v = d->second[0];
        if (!v.dims.empty() || !v.ptrs.empty() || v.init_a >= v.init_b) return;
        auto constants_and = [&](size_t a, size_t b, const std::string &var) {
            for (size_t k = a; k < b; k++)
                if (S(k).kind == IDENT && txt(k) != var && !rg.group_consts.count(txt(k)))
                    return false;
            return true;
        };
        if (!constants_and(v.init_a, v.init_b, "") || !constants_and(it.cond_a, it.cond_b, v.name) ||
            !constants_and(it.incr_a, it.incr_b, v.name))
            return;
        for (size_t k = it.incr_b + 2; k + 1 < it.b; k++)  // the body, inside its braces
            if (S(k).kind == IDENT && txt(k) == v.name && !(k > 0 && (is(k - 1, ".") || is(k - 1, "->"))) &&
                modified_at(k, it.b, true))
                return;
        rg.uniform_loops.insert(it.a);
        rg.uniform_vars.insert(v.name);
    }

    // ---- the barriers the regions add ----------------------------------------
    // The region code runs a kernel as pieces, each one loop over the threads: the
    // statements between two barriers or loop boundaries, and a loop's init, condition
    // and increment (of a loop every thread runs alike, only its body). Every thread
    // finishes a piece before any thread starts the next one, so where two pieces follow
    // each other with no barrier of the kernel's between them (the code before a loop and
    // the loop's first stretch, its last stretch and the code after it, the condition and
    // either) the regions add a barrier that a GPU does not have. It hides a race when one
    // thread's piece touches memory that another thread's later piece touches: the fibers
    // run each thread from barrier to barrier, in the schedule's order, and show it. So
    // the regions take a kernel only if no two pieces of one stretch between barriers (on
    // any path) touch the same shared memory; then every schedule gives what it gives on
    // the fibers. Touching is decided by name, erring towards "touches":
    //   - a threadgroup array of the kernel is its own memory; `t[lid]` (lid the kernel's
    //     thread_index_in_threadgroup, never assigned or declared again; a subscript per
    //     dimension; not under &) is the thread's own element, which no other thread's
    //     `t[lid]` is;
    //   - a threadgroup pointer (a parameter, a local whose type or initialiser says
    //     threadgroup, an auto local from a threadgroup name, a struct or alias with a
    //     threadgroup member, the word itself, as in a cast) may be any threadgroup memory;
    //   - device memory is all one (buffers may overlap), written through a pointer or
    //     reference not to const;
    //   - a read (`t[i]`, `p[i]`: every subscript, then no assignment, ++, --, call; not
    //     under &, not passed whole) does not race with a read;
    //   - setting a pointer (`C += offset;`, `T *p = (T *)As4;`, `p++;`) touches nothing.
    // A loop every thread runs alike may run no round at all (the code before it meets the
    // code after it) unless its start and bound are literals that say it runs one.
    enum { SH_TG_ARRAY = 1, SH_TG_PTR = 2, SH_DEV_READ = 4, SH_DEV_WRITE = 8 };
    struct Shared {
        std::map<std::string, int> kind;     // name -> SH_* bits
        std::map<std::string, size_t> dims;  // threadgroup array -> its dimensions
        std::set<std::string> pointers;      // assigning one moves a pointer
        std::string lid;                     // thread_index_in_threadgroup, "" if not usable
    };
    struct Use {  // lines of the first access and of the first that may write (0: none)
        int any = 0, write = 0;
        void add(int line, bool w) {
            if (!any) any = line;
            if (w && !write) write = line;
        }
        void add(const Use &u) {
            if (!any) any = u.any;
            if (!write) write = u.write;
        }
    };
    struct Touch {
        // threadgroup array -> its use as the thread's own element (t[lid]), and its other use
        std::map<std::string, std::pair<Use, Use>> arrays;
        Use tg_ptr, tg, dev;  // through threadgroup pointers; all threadgroup memory; device
    };

    // Statement bounds around sig index j inside (a, b): past the last ; { } ( before it,
    // up to the next ; { } after it.
    std::pair<size_t, size_t> stmt_around(size_t j, size_t a, size_t b) {
        size_t s = j, e = j;
        while (s > a && !is(s - 1, ";") && !is(s - 1, "{") && !is(s - 1, "}") && !is(s - 1, "("))
            s--;
        while (e < b && !is(e, ";") && !is(e, "{") && !is(e, "}")) e++;
        return {s, e};
    }

    Shared shared_names(const Kernel &kn, size_t a, size_t b, const std::set<size_t> &tg,
                        const std::set<std::string> &modified) {
        Shared sh;
        for (size_t k : tg) {  // threadgroup TYPE name[d]..., name2[d]...;
            for (size_t j = k + 1; j < b && !is(j, ";"); j++) {
                if (is(j, "<") || is(j, "[") || is(j, "(")) {
                    j = match(j) - 1;
                    continue;
                }
                if (S(j).kind != IDENT || !(is(j + 1, "[") || is(j + 1, ",") || is(j + 1, ";")))
                    continue;
                size_t d = 0;
                for (size_t q = j + 1; is(q, "["); q = match(q)) d++;
                sh.kind[txt(j)] |= SH_TG_ARRAY;
                sh.dims[txt(j)] = d;
            }
        }
        // Types that hold a pointer with an address space: structs with such a member,
        // aliases of such a pointer (at any scope of the user's code).
        std::set<std::string> holders;
        auto holds = [&](size_t j) {
            return is(j, "threadgroup") || is(j, "device") || holders.count(txt(j));
        };
        for (size_t n = ~(size_t)0; n != holders.size();) {  // until no new one: a struct of holders
            n = holders.size();
            for (auto &df : definitions) {
                if (!df.is_class) continue;
                bool spaces = false;
                for (size_t j = df.open; j < df.close; j++) spaces = spaces || holds(j);
                for (size_t j = df.stmt; j < df.open && spaces; j++)
                    if ((is(j, "struct") || is(j, "class") || is(j, "union")) && S(j + 1).kind == IDENT)
                        holders.insert(txt(j + 1));
            }
            for (size_t k = 0; k < sig.size(); k++) {
                if (!S(k).user || !(is(k, "typedef") || (is(k, "using") && is(k + 2, "=")))) continue;
                size_t e = k;
                bool spaces = false;
                for (; e < sig.size() && !is(e, ";"); e++) {
                    spaces = spaces || holds(e);
                    if (is(e, "{")) e = match(e) - 1;  // typedef struct { ... } name;
                }
                if (spaces) holders.insert(is(k, "using") ? txt(k + 1) : txt(e - 1));
            }
        }
        for (auto &p : kn.params) {
            if (p.name.empty()) continue;
            int kind = 0;
            if (p.kind == CAMEL_SIM_PARAM_THREADGROUP || p.space == "threadgroup") kind |= SH_TG_PTR;
            if (p.space == "device") kind |= SH_DEV_READ | (p.pointee_const ? 0 : SH_DEV_WRITE);
            for (auto &w : p.type_words)
                if (holders.count(w)) kind |= SH_TG_PTR | SH_DEV_READ | SH_DEV_WRITE;
            if (kind) sh.kind[p.name] |= kind;
            if (kind && p.pointer && !p.reference) sh.pointers.insert(p.name);
            if (p.kind == CAMEL_SIM_PARAM_BUILTIN && p.builtin == "thread_index_in_threadgroup" &&
                !modified.count(p.name))
                sh.lid = p.name;
        }
        // Locals: the names a statement declares, when its type says threadgroup or device,
        // names a holder, or is deduced (auto, decltype) from a shared name. Until nothing
        // changes (an auto local from an auto local).
        for (bool changed = true; changed;) {
            changed = false;
            for (size_t j = a; j < b; j++) {
                bool space = is(j, "threadgroup") || is(j, "device");
                bool deduced = is(j, "auto") || is(j, "decltype");
                if (tg.count(j) || !(space || deduced || holders.count(txt(j)))) continue;
                auto r = stmt_around(j, a, b);
                int kind = is(j, "threadgroup") ? SH_TG_PTR : 0;
                if (is(j, "device")) {
                    kind |= SH_DEV_READ | SH_DEV_WRITE;
                    for (size_t q = r.first; q < r.second && !is(q, "*") && !is(q, "&"); q++)
                        if (is(q, "const")) kind &= ~SH_DEV_WRITE;  // device const float *p
                }
                if (holders.count(txt(j))) kind |= SH_TG_PTR | SH_DEV_READ | SH_DEV_WRITE;
                for (size_t q = r.first; q < r.second && deduced; q++) {
                    auto f = sh.kind.find(txt(q));
                    if (f != sh.kind.end() && S(q).kind == IDENT)
                        kind |= (f->second & SH_TG_ARRAY ? SH_TG_PTR : 0) | (f->second & ~SH_TG_ARRAY);
                }
                if (!kind) continue;
                bool init = false;  // in a declarator's initialiser (after its =)
                for (size_t q = r.first + 1; q < r.second; q++) {
                    if (is(q, "(") || is(q, "[")) {
                        q = match(q) - 1;
                        continue;
                    }
                    if (is(q, "=") || is(q, ",")) init = is(q, "=");
                    if (S(q).kind != IDENT || init) continue;
                    bool declared = is(q - 1, "*") || is(q - 1, "&") || is(q - 1, "&&") ||
                                    S(q - 1).kind == IDENT || is(q - 1, ">") ||
                                    (is(q - 1, ")") && deduced);
                    bool ends = is(q + 1, "=") || is(q + 1, ";") || is(q + 1, ",") || is(q + 1, "[") ||
                                is(q + 1, ")") || is(q + 1, ":") || is(q + 1, "(") || q + 1 == r.second;
                    if (!declared || !ends || (sh.kind.count(txt(q)) && sh.kind[txt(q)] & SH_TG_ARRAY))
                        continue;
                    int &have = sh.kind[txt(q)];
                    if ((have | kind) != have) changed = true;
                    have |= kind;
                    if (is(q - 1, "*")) sh.pointers.insert(txt(q));
                }
            }
        }
        // lid must be the builtin wherever it is named: not declared again in a block
        // (`uint lid`, `T *lid`, `const T &lid`; `a * lid` is no declaration)
        for (size_t k = 2; k < b && !sh.lid.empty(); k++) {
            if (k < a || txt(k) != sh.lid) continue;
            bool ptr = (is(k - 1, "*") || is(k - 1, "&")) && S(k - 2).kind == IDENT &&
                       (is(k - 3, ";") || is(k - 3, "{") || is(k - 3, "}") || is(k - 3, "(") ||
                        S(k - 3).kind == IDENT);
            if (S(k - 1).kind == IDENT || ptr) sh.lid.clear();
        }
        return sh;
    }

    // Is the statement from s (a statement start) to the next ';' within b one that only
    // sets a pointer: `T *p = e;`, `p = e;`, `p += e;` (p a shared name's pointer) with e
    // pointer arithmetic on shared names (no subscript, member, call or * on one)? Then
    // it touches no shared memory: the index past its ';', else 0.
    size_t pointer_move(size_t s, size_t b, const Shared &sh) {
        size_t e = s, eq = 0;
        for (; e < b && !is(e, ";"); e++) {
            if (is(e, "(") || is(e, "[") || is(e, "{")) {
                e = match(e) - 1;
            } else if (is(e, ",")) {
                return 0;  // more than one declarator or expression
            } else if (!eq && (is(e, "=") || is(e, "+=") || is(e, "-="))) {
                eq = e;
            }
        }
        if (e >= b || !eq || S(eq - 1).kind != IDENT || !sh.pointers.count(txt(eq - 1))) return 0;
        bool decl = eq >= s + 3 && is(eq - 2, "*") && is(eq, "=") &&
                    (S(eq - 3).kind == IDENT || is(eq - 3, ">"));  // T *p = e; (not *p = e;)
        if (eq - 1 != s && !decl) return 0;                    // p = e;
        for (size_t q = eq + 1; q < e; q++) {
            if (is(q, "*") && (is(q + 1, "(") || sh.kind.count(txt(q + 1)))) return 0;  // *p, *(p + 1)
            if (is(q, "(") && q > 0 && (S(q - 1).kind == IDENT || is(q - 1, ">") || is(q - 1, "]"))) {
                for (size_t r = q + 1; r + 1 < match(q); r++)  // a call (or T(x)) given a shared name
                    if (S(r).kind == IDENT && sh.kind.count(txt(r))) return 0;
                q = match(q) - 1;
                continue;
            }
            if (S(q).kind == IDENT && sh.kind.count(txt(q)) &&
                (is(q + 1, "[") || is(q + 1, "->") || is(q + 1, ".") || is(q + 1, "(")))
                return 0;
        }
        return e + 1;
    }

    // Is the access at k (a shared name, `subs` subscripts after it) one that only reads:
    // name[i]..., then members, then no assignment, ++, --, call; not under &, ++, --; not
    // a whole argument (a callee may take it by reference)?
    bool only_reads(size_t k, size_t subs) {
        size_t j = k + 1, n = 0;
        for (; is(j, "["); j = match(j)) n++;
        if (n != subs) return false;
        while ((is(j, ".") || is(j, "->")) && S(j + 1).kind == IDENT) j += 2;
        if (is_assign_op(j) || is(j, "(") || is(j, "[")) return false;
        if (k > 0 && (is(k - 1, "&") || is(k - 1, "++") || is(k - 1, "--"))) return false;
        bool whole_arg = k > 0 && (is(k - 1, "(") || is(k - 1, ",")) && (is(j, ",") || is(j, ")"));
        return !whole_arg;
    }

    // What the tokens [a, b) of one piece touch, added to t.
    void touch_range(size_t a, size_t b, const Shared &sh, Touch &t) {
        auto starts = [&](size_t k) {  // a statement, or the body of an if or a for, begins
            return k < a || is(k, ";") || is(k, "{") || is(k, "}") || is(k, ")");
        };
        auto ends = [&](size_t k) { return is(k, ";") || is(k, ")"); };
        for (size_t k = a; k < b; k++) {
            if (k == a || is(k - 1, ";") || is(k - 1, "{") || is(k - 1, "}")) {
                size_t past = pointer_move(k, b, sh);
                if (past) {
                    k = past - 1;
                    continue;
                }
            }
            int line = S(k).line;
            if (is(k, "threadgroup")) t.tg_ptr.add(line, true), t.tg.add(line, true);  // a cast
            if (is(k, "device")) t.dev.add(line, true);
            if (S(k).kind != IDENT || (k > 0 && (is(k - 1, ".") || is(k - 1, "->") || is(k - 1, "::"))))
                continue;
            auto f = sh.kind.find(txt(k));
            if (f == sh.kind.end()) continue;
            if (sh.pointers.count(txt(k))) {  // p = q; p += n; p++; ++p; (q, n as they are)
                bool assigns = (is(k + 1, "=") || is(k + 1, "+=") || is(k + 1, "-=")) && starts(k - 1);
                bool steps = (is(k + 1, "++") || is(k + 1, "--")) && starts(k - 1) && ends(k + 2);
                bool pre = k > 1 && (is(k - 1, "++") || is(k - 1, "--")) && starts(k - 2) && ends(k + 1);
                if (assigns || steps || pre) continue;
            }
            bool pointer = sh.pointers.count(txt(k)) != 0;
            if (f->second & SH_TG_ARRAY) {
                auto d = sh.dims.find(txt(k));
                size_t dims = d == sh.dims.end() ? 0 : d->second;
                bool own = !sh.lid.empty() && dims > 0 && is(k + 1, "[") && txt(k + 2) == sh.lid &&
                           is(k + 3, "]") && !(k > 0 && is(k - 1, "&"));
                for (size_t j = k + 1, n = 0; own; j = match(j), n++)
                    if (!is(j, "[")) {
                        own = n == dims;  // every subscript: an element, not a row
                        break;
                    }
                bool w = !only_reads(k, dims);
                auto &use = t.arrays[txt(k)];
                (own ? use.first : use.second).add(line, w);
                t.tg.add(line, w);
            }
            if (f->second & SH_TG_PTR) {
                bool w = !(pointer && only_reads(k, 1));
                t.tg_ptr.add(line, w);
                t.tg.add(line, w);
            }
            if (f->second & SH_DEV_READ)
                t.dev.add(line, (f->second & SH_DEV_WRITE) && !only_reads(k, pointer ? 1 : 0));
        }
    }

    // All of p into state (what the pieces of a stretch touched).
    static void merge(Touch &state, const Touch &p) {
        for (auto &x : p.arrays) {
            auto &use = state.arrays[x.first];
            use.first.add(x.second.first);
            use.second.add(x.second.second);
        }
        state.tg_ptr.add(p.tg_ptr);
        state.tg.add(p.tg);
        state.dev.add(p.dev);
    }

    // Does piece p touch what an earlier piece of its stretch (state) touched, one of the
    // two writing? Then why says where.
    bool conflict(const Touch &state, const Touch &p, std::string &why) {
        auto clash = [&](const Use &x, const Use &y, const std::string &what) {
            if (!x.any || !y.any || !(x.write || y.write)) return false;
            int l1 = y.write ? x.any : x.write, l2 = y.write ? y.write : y.any;
            std::string a = std::to_string(std::min(l1, l2)), b = std::to_string(std::max(l1, l2));
            why = (a == b ? "no barrier between two stretches of line " + a
                          : "no barrier between line " + a + " and line " + b) +
                  ", which both touch " + what + ", and the barrier regions would add one";
            return true;
        };
        for (auto &x : p.arrays) {  // one thread's own element is no other thread's
            auto have = state.arrays.find(x.first);
            if (have == state.arrays.end()) continue;
            const std::string what = "threadgroup memory '" + x.first + "'";
            const Use &s_own = have->second.first, &s_other = have->second.second;
            if (clash(s_other, x.second.second, what) || clash(s_other, x.second.first, what) ||
                clash(s_own, x.second.second, what))
                return true;
        }
        return clash(state.tg_ptr, p.tg, "threadgroup memory") ||
               clash(state.tg, p.tg_ptr, "threadgroup memory") ||
               clash(state.dev, p.dev, "device memory");
    }

    // Does a loop every thread runs alike go round at least once? Only said for a literal
    // start and a comparison with a literal: `for (uint k = 0; k < 6; k++)`.
    bool runs_once(const RItem &it, const RegionGen &rg) {
        auto d = rg.decl_at.find(it.init_a);
        if (d == rg.decl_at.end() || d->second.size() != 1) return false;
        const RDecl &v = d->second[0];
        if (v.init_b != v.init_a + 1 || S(v.init_a).kind != NUMBER || it.cond_b != it.cond_a + 3)
            return false;
        bool left = txt(it.cond_a) == v.name;  // k < 6, or 6 > k
        size_t lit = left ? it.cond_a + 2 : it.cond_a;
        if (S(lit).kind != NUMBER || txt(left ? it.cond_a : it.cond_a + 2) != v.name) return false;
        long long k = strtoll(txt(v.init_a).c_str(), nullptr, 0);
        long long n = strtoll(txt(lit).c_str(), nullptr, 0);
        if (!left) std::swap(k, n);  // 6 > k: the test as written, the literal first
        const std::string &op = txt(it.cond_a + 1);
        if (op == "<") return k < n;
        if (op == "<=") return k <= n;
        if (op == ">") return k > n;
        if (op == ">=") return k >= n;
        return op == "!=" && k != n;
    }

    // Walks items the way region_items runs them; state: what the pieces since the last
    // barrier touched, on any path. False (why says where) when a piece touches what an
    // earlier piece of its stretch touched.
    bool walk_pieces(const std::vector<RItem> &items, Touch &state, const Shared &sh,
                     const RegionGen &rg, std::string &why) {
        Touch cur;
        auto piece = [&](Touch &p) {
            if (conflict(state, p, why)) return false;
            merge(state, p);
            p = Touch();
            return true;
        };
        auto part = [&](size_t a, size_t b) {
            Touch p;
            touch_range(a, b, sh, p);
            return piece(p);
        };
        for (auto &it : items) {
            if (it.kind == RItem::STMT) {
                if (!rg.tg.count(it.a)) touch_range(it.a, it.b, sh, cur);
                continue;
            }
            if (!piece(cur)) return false;
            if (it.kind == RItem::BARRIER) {
                state = Touch();
                continue;
            }
            bool uniform = rg.uniform_loops.count(it.a) != 0;  // no init, cond, incr pieces
            if (!uniform && !part(it.init_a, it.init_b)) return false;
            // The loop is left after a condition fails, or, every thread running it alike,
            // after the body; also before it when it may run no round at all.
            Touch entry = state, exit = uniform && !runs_once(it, rg) ? state : Touch(), back;
            // Twice: the first round's end (what the back edge carries) does not depend
            // on its start, as the body has a barrier at its top level.
            for (int round = 0; round < 2; round++) {
                state = entry;
                merge(state, back);
                if (!uniform) {
                    if (!part(it.cond_a, it.cond_b)) return false;
                    merge(exit, state);  // the condition fails: the loop is left here
                }
                if (!walk_pieces(it.body, state, sh, rg, why)) return false;
                if (!uniform && !part(it.incr_a, it.incr_b)) return false;
                if (uniform) merge(exit, state);
                back = state;
            }
            state = exit;
        }
        return piece(cur);
    }

    // Text of [a, b) as the kernel wrote it (rewritten), with hoisted names indexed by the
    // thread, newlines kept so the lines stay put.
    std::string region_text(size_t a, size_t b, const RegionGen &rg) {
        std::string s;
        for (size_t k = a; k < b; k++) {
            if (k > a)
                for (size_t r = sig[k - 1] + 1; r < sig[k]; r++)
                    if (t[r].kind == NEWLINE || t[r].kind == SPACE) s += t[r].text;
            const std::string &x = txt(k);
            bool member = k > 0 && (is(k - 1, ".") || is(k - 1, "->") || is(k - 1, "::"));
            if (S(k).kind == IDENT && !member && rg.hoisted.count(x))
                s += x + "[__camel_i]";
            else
                s += S(k).out;
        }
        return s;
    }

    // A statement inside a region: declarations of hoisted names become assignments.
    std::string region_stmt(size_t a, size_t b, RegionGen &rg) {
        auto d = rg.decl_at.find(a);
        if (d == rg.decl_at.end()) return region_text(a, b, rg);
        bool plain = true;  // no declarator moves: the statement as written
        for (auto &x : d->second)
            plain = plain && !rg.hoisted.count(x.name) && !rg.group_consts.count(x.name);
        if (plain) return region_text(a, b, rg);
        std::string s;
        for (auto &x : d->second) {
            if (rg.group_consts.count(x.name)) continue;  // at group scope already
            std::string init = x.init_a < x.init_b ? region_text(x.init_a, x.init_b, rg) : "";
            if (rg.hoisted.count(x.name)) {
                if (!init.empty()) s += x.name + "[__camel_i] = " + init + "; ";
            } else {
                s += x.type + " " + x.ptrs + x.name + x.dims + (init.empty() ? "" : " = " + init) +
                     "; ";
            }
        }
        return s;
    }

    std::string line_marker(size_t k) {
        // the file of the last line marker before the token, with the token's line
        size_t r = sig[k];
        while (r > 0 && t[r].kind != DIRECTIVE) r--;
        const std::string &d = t[r].out;
        size_t q1 = d.find('"'), q2 = d.rfind('"');
        std::string file = q1 != std::string::npos && q2 > q1 ? d.substr(q1, q2 - q1 + 1) : "\"?\"";
        return "\n# " + std::to_string(S(k).line) + " " + file + "\n";
    }

    // One region: the statements run by every thread, in the group's order.
    std::string region_loop(const std::string &body, const std::string &builtins) {
        return "    __camel_each(__camel_g, __camel_list, &__camel_seed, [&](uint32_t __camel_x, uint32_t "
               "__camel_y, uint32_t __camel_z, uint32_t __camel_i) __attribute__((always_inline)) "
               "{\n        (void)__camel_x; (void)__camel_y; (void)__camel_z; (void)__camel_i;\n" +
               builtins + body + "\n# 1 \"<camel generated>\"\n    });\n";
    }

    std::string region_items(const std::vector<RItem> &items, RegionGen &rg,
                             const std::string &builtins) {
        std::string g, pending;
        auto flush = [&]() {
            if (!pending.empty()) g += region_loop(pending, builtins);
            pending.clear();
        };
        for (auto &it : items) {
            if (it.kind == RItem::STMT) {
                if (rg.tg.count(it.a)) continue;
                std::string s = region_stmt(it.a, it.b, rg);
                if (!s.empty()) pending += line_marker(it.a) + s;
            } else if (it.kind == RItem::BARRIER) {
                flush();
            } else if (rg.uniform_loops.count(it.a)) {
                flush();
                g += line_marker(it.init_a) + "    for (" + region_text(it.init_a, it.init_b, rg) + " " +
                     region_text(it.cond_a, it.cond_b, rg) + "; " + region_text(it.incr_a, it.incr_b, rg) +
                     ") {\n# 1 \"<camel generated>\"\n";
                g += region_items(it.body, rg, builtins);
                g += "    }\n";
            } else {
                flush();
                std::string init = region_stmt(it.init_a, it.init_b, rg);
                if (!init.empty()) g += region_loop(line_marker(it.init_a) + init, builtins);
                std::string line = std::to_string(it.line);
                g += "    for (;;) {\n        uint32_t __camel_go = 0, __camel_stop = 0;\n";
                g += region_loop(line_marker(it.cond_a) + "if (" + region_text(it.cond_a, it.cond_b, rg) +
                                     ") __camel_go++; else __camel_stop = __camel_i;",
                                 builtins);
                g += "        if (__camel_go == 0) break;\n"
                     "        if (__camel_go != __camel_n) __camel_diverged(__camel_g, __camel_stop, " +
                     line + ", __camel_go, __camel_n);\n";
                g += region_items(it.body, rg, builtins);
                std::string incr = region_text(it.incr_a, it.incr_b, rg);
                g += region_loop(line_marker(it.incr_a) + incr + ";", builtins);
                g += "    }\n";
            }
        }
        flush();
        return g;
    }

    // The region function of kernel kn, or "" when it must keep the fibers.
    // CAMEL_SIM_VERBOSE=1 says, per kernel with barriers, which way it runs and why.
    std::string no_region(const Kernel &kn, const char *why) {
        if (getenv("CAMEL_SIM_VERBOSE"))
            fprintf(stderr, "[sim] %s: fibers (%s)\n", kn.host_name.c_str(), why);
        return "";
    }
    std::string region_entry(const Kernel &kn, const std::string &F, const std::string &n) {
        if (target != TARGET_SIM || kn.qualified.find("::") != std::string::npos)
            return no_region(kn, "in a namespace");
        if (!uses_op(kn.body_owner, USES_BARRIER) || uses_op(kn.body_owner, USES_SIMD))
            return no_region(kn, "a SIMD-group function");
        auto fit = functions.find(kn.body_owner);
        if (fit == functions.end() || fit->second.size() != 1) return no_region(kn, "overloaded");
        const FunctionInfo &fi = fit->second[0];
        size_t a = fi.body_begin + 1, b = fi.body_end;
        // A template kernel: the region function is a template with the same parameters.
        std::string tparams;
        if (!kn.targs.empty()) {
            if (!is(fi.stmt, "template") || !is(fi.stmt + 1, "<"))
                return no_region(kn, "a template without its parameter list");
            for (size_t k = fi.stmt + 1, e = match(fi.stmt + 1); k < e; k++) tparams += S(k).out + " ";
        }
        std::set<std::string> params, builtin_params;
        for (auto &p : kn.params) {
            params.insert(p.name);
            if (p.kind == CAMEL_SIM_PARAM_BUILTIN) builtin_params.insert(p.name);
        }
        std::set<std::string> modified;  // parameters the kernel assigns to: one per thread
        for (size_t k = a; k < b; k++) {
            if (!S(k).user) return no_region(kn, "code from a system header");
            if (is(k, "return") || is(k, "goto") || is(k, "static"))
                return no_region(kn, "return, goto or static in its body");
            if (S(k).kind != IDENT) continue;
            if (params.count(txt(k)) && !(k > 0 && (is(k - 1, ".") || is(k - 1, "->"))) &&
                modified_at(k, b, builtin_params.count(txt(k)) != 0))
                modified.insert(txt(k));
            // a user function it calls must not reach a barrier itself
            if (txt(k) != kn.body_owner && functions.count(txt(k)) && uses_fibers(txt(k)))
                return no_region(kn, "a function it calls has a barrier");
        }
        std::set<size_t> tg;
        for (size_t k : tg_storage)
            if (k > fi.body_begin && k < fi.body_end) tg.insert(k);
        std::vector<RItem> items;
        if (!parse_regions(a, b, items, true, tg))
            return no_region(kn, "a barrier outside the top level and its for loops, or a loop "
                                 "around barriers that neither begins nor ends with one");
        RegionGen rg;
        rg.tg = tg;
        if (!kn.targs.empty())  // template parameters are constants too
            for (size_t k = fi.stmt + 2, e = match(fi.stmt + 1); k + 1 < e; k++)
                if (S(k).kind == IDENT && (is(k + 1, ",") || is(k + 1, ">") || is(k + 1, "=")))
                    rg.group_consts.insert(txt(k));
        region_scan(items, rg, tg, params);
        if (!rg.ok) return no_region(kn, "a local declared twice, or in a form it cannot move");
        for (auto &d : rg.decls) {
            if (rg.group_consts.count(d.first) || rg.uniform_vars.count(d.first)) continue;
            auto &u = rg.used_in[d.first];
            if (u.size() > 1) {
                if (d.second.type.find("auto") != std::string::npos) return no_region(kn, "an auto variable lives across a barrier");
                if (!d.second.dims.empty() && d.second.init_a < d.second.init_b) return no_region(kn, "an initialised array lives across a barrier");
                rg.hoisted.insert(d.first);
            }
        }
        {
            Shared sh = shared_names(kn, a, b, tg, modified);
            Touch state;
            std::string why;
            if (!walk_pieces(items, state, sh, rg, why)) return no_region(kn, why.c_str());
        }
        // A hoisted name must not be declared again in a nested block (it would be indexed).
        for (size_t k = a; k < b; k++) {
            if (S(k).kind != IDENT || !rg.hoisted.count(txt(k))) continue;
            bool declared_here = false;
            for (auto &da : rg.decl_at)
                for (size_t j = da.first; j < sig.size() && !is(j, ";") && j < b; j++)
                    if (j == k) declared_here = true;
            bool ptr_decl = k > 2 && (is(k - 1, "*") || is(k - 1, "&")) && S(k - 2).kind == IDENT &&
                            (is(k - 3, ";") || is(k - 3, "{") || is(k - 3, "}"));
            if (!declared_here && k > 0 && (S(k - 1).kind == IDENT || ptr_decl || is(k - 1, ">")))
                return no_region(kn, "a name declared again in a nested block");
        }

        std::string fname = tparams.empty() ? "__camel_group_" + n : "__camel_regions_" + n;
        std::string g = (tparams.empty() ? "" : "template " + tparams + "\n") + "static void " +
                        fname +
                        "(void *const *__camel_b, void *const *__camel_tgs, const camel_sim_group "
                        "*__camel_g) {\n    __camel_cur = __camel_g->thread;\n";
        std::string builtins, param_init, param_store;
        for (size_t j = 0; j < kn.params.size(); j++) {
            const Param &p = kn.params[j];
            std::string P = "__camel_param_t<" + std::to_string(j) + ", " + F + ">";
            std::string v = p.kind == CAMEL_SIM_PARAM_BUILTIN
                                ? varying_builtin(find_builtin(p.builtin), P, "__camel_")
                                : std::string();
            if (p.name.empty()) continue;
            std::string bound = bind_arg(p, P, "__camel_b", "__camel_tgs", "__camel_g->");
            if (modified.count(p.name)) {  // one copy per thread, set before the first region
                rg.hoisted.insert(p.name);
                param_store += "    " + P + " (*" + p.name + ") = (" + P + " (*))__builtin_alloca(sizeof(" +
                               P + ") * __camel_n);\n";
                param_init += p.name + "[__camel_i] = " + (v.empty() ? bound : v) + "; ";
            } else if (v.empty()) {
                g += "    " + P + " " + p.name + " = " + bound + "; (void)" + p.name + ";\n";
            } else {
                builtins += "        const " + P + " " + p.name + " = " + v + "; (void)" + p.name + ";\n";
            }
        }
        g += "    const uint32_t __camel_n = __camel_g->threads_per_threadgroup[0] *\n"
             "        __camel_g->threads_per_threadgroup[1] * __camel_g->threads_per_threadgroup[2];\n"
             "    const uint32_t __camel_ox = __camel_g->origin[0], __camel_oy = __camel_g->origin[1],\n"
             "                   __camel_oz = __camel_g->origin[2];\n"
             "    (void)__camel_ox; (void)__camel_oy; (void)__camel_oz;\n"
             "    uint64_t __camel_seed = __camel_g->seed;\n"
             "    uint32_t *__camel_list = nullptr;\n"
             "    if (__camel_g->order == CAMEL_SIM_GROUP_LIST) {\n"
             "        __camel_list = (uint32_t *)__builtin_alloca(4 * __camel_n);\n"
             "        for (uint32_t __camel_k = 0; __camel_k < __camel_n; __camel_k++)\n"
             "            __camel_list[__camel_k] = __camel_g->order_list[__camel_k];\n"
             "    }\n";
        // group scope: constants, threadgroup variables, and the per-thread arrays
        for (auto &da : rg.decl_at)
            for (auto &d : da.second)
                if (rg.group_consts.count(d.name))
                    g += line_marker(da.first) + d.qual + d.type + " " + d.name + " = " +
                         region_text(d.init_a, d.init_b, rg) + ";";
        for (size_t k : tg) {
            g += line_marker(k) + S(k).out;
        }
        g += "\n# 1 \"<camel generated>\"\n";
        for (auto &h : rg.hoisted) {
            if (modified.count(h)) continue;  // a parameter: param_store
            const RDecl &d = rg.decls[h];
            std::string T = d.type + " " + d.ptrs;
            // strip const: the array is written once per thread
            std::string Tn;
            for (size_t p = 0; p < T.size();) {
                if (T.compare(p, 5, "const") == 0 && (p + 5 == T.size() || !is_ident_char(T[p + 5])) &&
                    (p == 0 || !is_ident_char(T[p - 1]))) {
                    p += 5;
                } else {
                    Tn += T[p++];
                }
            }
            g += "    " + Tn + " (*" + h + ")" + d.dims + " = (" + Tn + " (*)" + d.dims +
                 ")__builtin_alloca(sizeof(" + Tn + d.dims + ") * __camel_n);\n";
        }
        g += param_store;
        if (!param_init.empty()) g += region_loop(param_init, builtins);
        g += region_items(items, rg, builtins);
        g += "}\n";
        if (getenv("CAMEL_SIM_VERBOSE")) fprintf(stderr, "[sim] %s: barrier regions\n", kn.host_name.c_str());
        if (!tparams.empty())
            g += "static void __camel_group_" + n +
                 "(void *const *b, void *const *tg, const camel_sim_group *g) {\n    " + fname +
                 kn.targs + "(b, tg, g);\n}\n";
        return g;
    }

    std::set<size_t> with_group_entry;  // kernels (by index) with a __camel_group_N

    bool has_group_entry(const Kernel &kn) {
        return !needs_current_thread(kn.body_owner);
    }

    // The group entry of a barrier-free kernel (no barrier, SIMD-group function or
    // `threadgroup` variable): the whole threadgroup as loops over its threads, with the
    // bindings and shared builtins loaded once and the thread's builtins computed from the
    // loop variables, so clang can inline the kernel and vectorise across threads (PoCL's
    // work-item loops). The threads still run one after the other in CAMEL_SIM_ORDER's
    // order: the loops count up (forward), down (reverse), or follow the runtime's list
    // (random); a vectorised loop computes what that order computes.
    std::string group_entry(const Kernel &kn, const std::string &fn, const std::string &F,
                            const std::string &n) {
        std::string g = "static void __camel_group_" + n +
                        "(void *const *b, void *const *tg, const camel_sim_group *g) {\n";
        g += "    (void)b; (void)tg;\n";
        std::string args;
        for (size_t j = 0; j < kn.params.size(); j++) {
            const Param &p = kn.params[j];
            std::string P = "__camel_param_t<" + std::to_string(j) + ", " + F + ">";
            std::string a = "__a" + std::to_string(j);
            std::string expr = p.kind == CAMEL_SIM_PARAM_BUILTIN
                                   ? varying_builtin(find_builtin(p.builtin), P)
                                   : std::string();
            if (expr.empty()) {
                g += "    " + P + " " + a + " = " + bind_arg(p, P, "b", "tg", "g->") + ";\n";
                expr = a;
            }
            args += std::string(j ? "," : "") + "\n            " + expr;
        }
        g += "    const uint32_t sx = g->threads_per_threadgroup[0], sy = g->threads_per_threadgroup[1],\n"
             "                   sz = g->threads_per_threadgroup[2];\n"
             "    const uint32_t ox = g->origin[0], oy = g->origin[1], oz = g->origin[2];\n"
             "    (void)ox; (void)oy; (void)oz;\n";
        g += "    auto thread = [&](uint32_t x, uint32_t y, uint32_t z, uint32_t i)\n"
             "                      __attribute__((always_inline, flatten)) {\n"
             "        (void)x; (void)y; (void)z; (void)i;\n"
             "        " + fn + "(" + args + ");\n"
             "    };\n";
        g += "    if (g->order == CAMEL_SIM_GROUP_FORWARD) {\n"
             "        for (uint32_t z = 0; z < sz; z++)\n"
             "            for (uint32_t y = 0; y < sy; y++) {\n"
             "                uint32_t row = (z * sy + y) * sx;\n"
             "                for (uint32_t x = 0; x < sx; x++) thread(x, y, z, row + x);\n"
             "            }\n"
             "    } else if (g->order == CAMEL_SIM_GROUP_REVERSE) {\n"
             "        for (uint32_t z = sz; z-- > 0;)\n"
             "            for (uint32_t y = sy; y-- > 0;) {\n"
             "                uint32_t row = (z * sy + y) * sx;\n"
             "                for (uint32_t x = sx; x-- > 0;) thread(x, y, z, row + x);\n"
             "            }\n"
             "    } else {\n"
             "        for (uint32_t k = 0, count = sx * sy * sz; k < count; k++) {\n"
             "            uint32_t i = g->order_list[k], yz = i / sx;\n"
             "            thread(i % sx, yz % sy, yz / sy, i);\n"
             "        }\n"
             "    }\n"
             "}\n";
        return g;
    }

    std::string generate() {
        std::string g = "\n# 1 \"<camel generated>\"\n";
        g += "// Entry wrappers and the library description (see shim/front/sim_abi.h).\n";
        g += "static const uint32_t __camel_zero3[3] = {0, 0, 0};\n";
        g += "// A thread's position (uint, ushort2, uint3, ...) from its coordinates.\n"
             "template <class P> static inline P __camel_xyz(uint32_t x, uint32_t y, uint32_t z) {\n"
             "    if constexpr (__camel_vt<P>::n == 1) {\n"
             "        return (P)x;\n"
             "    } else {\n"
             "        typedef typename __camel_vt<P>::elem E;\n"
             "        P r{};\n"
             "        r[0] = (E)x;\n"
             "        r[1] = (E)y;\n"
             "        if constexpr (__camel_vt<P>::n > 2) r[2] = (E)z;\n"
             "        return r;\n"
             "    }\n"
             "}\n";
        g += "// Barrier regions: f(x, y, z, i) for every thread of the group, in its order (random:\n"
             "// a new shuffle every pass, as the fibers do).\n"
             "template <class F>\n"
             "static inline __attribute__((always_inline)) void __camel_each(const camel_sim_group *g,\n"
             "        uint32_t *list, uint64_t *seed, F &&f) {\n"
             "    const uint32_t sx = g->threads_per_threadgroup[0], sy = g->threads_per_threadgroup[1],\n"
             "                   sz = g->threads_per_threadgroup[2];\n"
             "    if (g->order == CAMEL_SIM_GROUP_FORWARD) {\n"
             "        for (uint32_t z = 0; z < sz; z++)\n"
             "            for (uint32_t y = 0; y < sy; y++) {\n"
             "                uint32_t row = (z * sy + y) * sx;\n"
             "                for (uint32_t x = 0; x < sx; x++) f(x, y, z, row + x);\n"
             "            }\n"
             "    } else if (g->order == CAMEL_SIM_GROUP_REVERSE) {\n"
             "        for (uint32_t z = sz; z-- > 0;)\n"
             "            for (uint32_t y = sy; y-- > 0;) {\n"
             "                uint32_t row = (z * sy + y) * sx;\n"
             "                for (uint32_t x = sx; x-- > 0;) f(x, y, z, row + x);\n"
             "            }\n"
             "    } else {\n"
             "        uint32_t n = sx * sy * sz;\n"
             "        for (uint32_t k = n - 1; k > 0; k--) {\n"
             "            uint64_t r = (*seed += 0x9e3779b97f4a7c15ull);\n"
             "            r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ull;\n"
             "            r = (r ^ (r >> 27)) * 0x94d049bb133111ebull;\n"
             "            r ^= r >> 31;\n"
             "            uint32_t j = (uint32_t)(r % (k + 1)), tmp = list[k];\n"
             "            list[k] = list[j];\n"
             "            list[j] = tmp;\n"
             "        }\n"
             "        for (uint32_t k = 0; k < n; k++) {\n"
             "            uint32_t i = list[k], yz = i / sx;\n"
             "            f(i % sx, yz % sy, yz / sy, i);\n"
             "        }\n"
             "    }\n"
             "}\n"
             "// Some threads go round a loop around a barrier again, the others do not.\n"
             "[[maybe_unused]] static void __camel_diverged(const camel_sim_group *g, uint32_t thread,\n"
             "        uint32_t line, uint32_t go, uint32_t n) {\n"
             "    camel_sim_thread t = *g->thread;\n"
             "    t.thread_index_in_threadgroup = thread;\n"
             "    char msg[320];\n"
             "    __builtin_snprintf(msg, sizeof msg, \"leaves the loop around the threadgroup_barrier at \"\n"
             "        \"line %u while %u of the %u threads go round again; every thread of a \"\n"
             "        \"threadgroup must reach every barrier\", line, go, n);\n"
             "    __camel_rt->fail(&t, msg);\n"
             "}\n";
        std::set<std::string> names;
        for (size_t i = 0; i < kernels.size(); i++) {
            Kernel &kn = kernels[i];
            if (!names.insert(kn.host_name).second) {
                error(kn.line, "two kernels are named '" + kn.host_name + "'");
                continue;
            }
            if (skipped(kn)) continue;
            std::string fn = "::" + kn.qualified + kn.targs;  // ::matrix, not metal::matrix
            std::string F = "decltype(" + fn + ")";
            std::string n = std::to_string(i);
            assign_indices(kn);
            g += "static void __camel_entry_" + n +
                 "(void *const *b, void *const *tg, const camel_sim_thread *t) {\n";
            // The current thread matters only to barriers, SIMD-group functions and
            // threadgroup variables; a kernel without them skips the TLS store.
            if (needs_current_thread(kn.body_owner))
                g += "    __camel_cur = t;\n";
            g += "    (void)b; (void)tg; (void)t;\n";
            g += "    " + fn + "(";
            for (size_t j = 0; j < kn.params.size(); j++) {
                const Param &p = kn.params[j];
                std::string P = "__camel_param_t<" + std::to_string(j) + ", " + F + ">";
                if (j) g += ",";
                g += "\n        " + bind_arg(p, P, "b", "tg", "t->");
            }
            g += ");\n}\n";
            if (has_group_entry(kn)) {
                g += group_entry(kn, fn, F, n);
                with_group_entry.insert(i);
            } else {
                std::string region = region_entry(kn, F, n);
                if (!region.empty()) with_group_entry.insert(i);
                g += region;
            }
            if (!kn.params.empty()) {
                g += "static const camel_sim_param __camel_params_" + n + "[] = {\n";
                for (size_t j = 0; j < kn.params.size(); j++) {
                    const Param &p = kn.params[j];
                    std::string P = "__camel_param_t<" + std::to_string(j) + ", " + F + ">";
                    std::string size = p.kind == CAMEL_SIM_PARAM_BUFFER && !p.pointer
                                           ? "(uint32_t)sizeof(__camel_remove_ref_t<" + P + ">)"
                                           : "0";
                    // The type a buffer parameter binds: writable unless const (MSL `constant`
                    // becomes const too), and its alignment (checked against the offset).
                    std::string T = p.pointer ? "__camel_remove_ref_t<decltype(*" + P + "())>"
                                              : "__camel_remove_ref_t<" + P + ">";
                    std::string flags = p.kind == CAMEL_SIM_PARAM_BUFFER
                                            ? "!__is_const(" + T + "), (uint32_t)alignof(" + T + ")"
                                            : "0, 0";
                    int kind = p.absent ? CAMEL_SIM_PARAM_ABSENT : p.kind;
                    g += "    {\"" + p.name + "\", " + std::to_string(kind) + ", " +
                         std::to_string(p.index) + ", " + size + ", " + (p.pointer ? "1" : "0") +
                         ", " + flags + ", " +
                         (p.constant.empty() ? std::string("nullptr") : "\"" + p.constant + "\"") +
                         "},\n";
                }
                g += "};\n";
            }
        }
        g += "static const camel_sim_kernel_desc __camel_kernels[] = {\n";
        std::set<std::string> seen;
        int count = 0;
        for (size_t i = 0; i < kernels.size(); i++) {
            Kernel &kn = kernels[i];
            if (!seen.insert(kn.host_name).second || skipped(kn)) continue;
            int max_buffer = -1;
            for (auto &p : kn.params)
                if (p.kind == CAMEL_SIM_PARAM_BUFFER && !p.absent && p.index > max_buffer) max_buffer = p.index;
            bool fibers = uses_fibers(kn.body_owner);
            std::string n = std::to_string(i);
            g += "    {\"" + kn.host_name + "\", __camel_entry_" + n + ", " +
                 std::to_string(kn.params.size()) + ", " +
                 (kn.params.empty() ? std::string("nullptr") : "__camel_params_" + n) + ", " +
                 std::to_string(max_buffer) + ", " + (fibers ? "1" : "0") + ", " +
                 (with_group_entry.count(i) ? "__camel_group_" + n : std::string("nullptr")) +
                 "},\n";
            count++;
        }
        if (count == 0) g += "    {nullptr, nullptr, 0, nullptr, -1, 0, nullptr},\n";
        g += "};\n";
        g += "static const camel_sim_library_desc __camel_library = {" +
             std::to_string(CAMEL_SIM_ABI_VERSION) + ", " + std::to_string(count) +
             ", __camel_kernels};\n";
        g += "extern \"C\" __attribute__((visibility(\"default\"))) const camel_sim_library_desc *\n"
             "camel_sim_library(void) { return &__camel_library; }\n";
        g += "extern \"C\" __attribute__((visibility(\"default\"))) void\n"
             "camel_sim_bind(const camel_sim_runtime *rt) { __camel_rt = rt; }\n";
        return g;
    }
};

}  // namespace

bool check_includes(const std::string &source, const std::string &display, std::string &errors,
                    const std::vector<std::string> &dirs, const char *prefix) {
    static const char *const allowed_prefix[] = {"metal_", "simd/", nullptr};
    int line = 1;
    size_t i = 0;
    bool ok = true;
    std::string searched;  // for the message
    for (const std::string &d : dirs) searched += (searched.empty() ? "" : ", ") + d;
    while (i <= source.size()) {
        size_t e = source.find('\n', i);
        if (e == std::string::npos) e = source.size();
        std::string l = source.substr(i, e - i);
        size_t p = l.find_first_not_of(" \t");
        if (p != std::string::npos && l[p] == '#') {
            size_t q = l.find_first_not_of(" \t", p + 1);
            if (q != std::string::npos && l.compare(q, 7, "include") == 0) {
                size_t lt = l.find('<', q), gt = l.find('>', q);
                if (lt != std::string::npos && gt != std::string::npos && gt > lt) {
                    std::string name = l.substr(lt + 1, gt - lt - 1);
                    bool allowed = false;
                    for (int k = 0; allowed_prefix[k]; k++)
                        if (name.compare(0, strlen(allowed_prefix[k]), allowed_prefix[k]) == 0) allowed = true;
                    for (const std::string &d : dirs)  // a project header in the include path
                        if (!allowed && file_exists(d + "/" + name)) allowed = true;
                    std::string where = prefix + display + ":" + std::to_string(line) + ": '#include <" + name + ">': ";
                    if (allowed) {
                    } else if (name.find('/') == std::string::npos) {
                        errors += where + "Metal has no C or C++ standard library; include "
                                  "<metal_stdlib> and use its functions\n";
                        ok = false;
                    } else {
                        errors += where + "not found in the include path (" +
                                  (searched.empty() ? std::string("empty") : searched) +
                                  "); for a project header, pass the directory it is relative to: "
                                  "camel.metal.compile(..., include_dirs=[dir]) or CAMEL_INCLUDE_PATH\n";
                        ok = false;
                    }
                }
            }
        }
        line++;
        i = e + 1;
    }
    return ok;
}

// Headers from outside the project (the system's C/C++ library) that a project
// header pulled in: clang -E's line markers (`# 1 "file" 1 3` enters a system
// header) show which file included which. Entering a system header that is not
// one of ours (under `inc`) from a user file is the standard library.
bool check_system_headers(const std::string &pre, const std::string &inc, const std::string &display,
                          const std::string &main_file, std::string &errors, const char *prefix) {
    struct File {
        std::string name;
        bool system;
        int line;  // the line the next marker follows
    };
    std::vector<File> stack = {{main_file, false, 0}};
    bool ok = true;
    for (size_t i = 0; i < pre.size();) {
        size_t e = pre.find('\n', i);
        if (e == std::string::npos) e = pre.size();
        if (pre[i] == '#' && i + 1 < e && pre[i + 1] == ' ') {
            std::string l = pre.substr(i, e - i);
            size_t q1 = l.find('"'), q2 = l.rfind('"');
            if (q1 != std::string::npos && q2 > q1) {
                int n = atoi(l.c_str() + 2);
                std::string file = l.substr(q1 + 1, q2 - q1 - 1), flags = l.substr(q2 + 1);
                bool enter = flags.find(" 1") != std::string::npos;
                bool leave = flags.find(" 2") != std::string::npos;
                bool system = flags.find(" 3") != std::string::npos;
                if (file.empty() || file[0] == '<') {  // <built-in>, <command line>
                } else if (enter) {
                    const File &from = stack.back();
                    bool ours = file.compare(0, inc.size() + 1, inc + "/") == 0;
                    if (system && !ours && !from.system) {
                        std::string who = from.name == main_file ? display : from.name;
                        errors += prefix + who + ":" + std::to_string(from.line) + ": includes " +
                                  file + ", a C or C++ standard-library header (Metal has none); "
                                  "include <metal_stdlib> and use its functions\n";
                        ok = false;
                    }
                    stack.push_back({file, system, n});
                } else {  // leaving for `file` (the includer), or a new line number in it
                    if (leave)
                        while (stack.size() > 1 && stack.back().name != file) stack.pop_back();
                    stack.back().line = n;
                }
            }
        } else {
            stack.back().line++;
        }
        i = e + 1;
    }
    return ok;
}

// A line marker `# 12 "file" 2` as `#line 12 "file"` (the flags refer to an
// include stack the translated file does not have); other directives as they are.
static std::string line_directive(const std::string &d) {
    size_t p = d.find_first_not_of(" \t#");
    size_t q2 = d.rfind('"');
    if (p == std::string::npos || !is_digit(d[p]) || q2 == std::string::npos) return d;
    return "#line " + d.substr(p, q2 + 1 - p);
}

bool rewrite_msl(const std::string &preprocessed, const std::string &main_file,
                 const std::string &display, std::string &out, std::string &errors) {
    std::string unused;
    return rewrite_msl_for(TARGET_SIM, preprocessed, main_file, display, out, errors, unused);
}

bool rewrite_msl_for(Target target, const std::string &preprocessed, const std::string &main_file,
                     const std::string &display, std::string &out, std::string &errors,
                     std::string &kernels, const std::string &only_kernel) {
    Lexer lx(preprocessed, main_file, display);
    lx.run();
    // __FILE__ (assert's message) names the temporary copy: name the .metal file instead
    std::string quoted = "\"" + main_file + "\"";
    for (Token &tk : lx.toks)
        if (tk.kind == STRING && tk.user && tk.text == quoted) {
            tk.out = "\"";
            for (char c : display) tk.out += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
            tk.out += "\"";
        }
    Rewriter rw(lx.toks, display);
    rw.target = target;
    rw.only_kernel = only_kernel;
    if (target == TARGET_CUDA) {
        rw.prefix = "[cuda] ";
        rw.shim = "the CUDA shim";
    }
    rw.run();
    kernels.clear();
    std::string generated;
    if (target == TARGET_CHECK) {
        // the typed check: the rewrite's own checks ran in the translation; overloads that
        // differ only in address spaces are real overloads here; no entry wrappers
        rw.errors.clear();
        rw.implicit_thread();
    } else {
        rw.check_recursion();
        rw.check_address_spaces();
        rw.merge_address_space_overloads();
        generated = target == TARGET_CUDA ? rw.generate_cuda(kernels) : rw.generate();
    }
    if (!rw.errors.empty()) {
        errors = rw.errors;
        return false;
    }
    out.clear();
    out.reserve(preprocessed.size() + generated.size() + 1024);
    for (auto &tok : lx.toks) {
        // CUDA: the compat headers are not copied from the preprocessed text;
        // the translator puts their own text in front (readable, with comments)
        if (target != TARGET_SIM && !tok.user) continue;
        if (tok.kind == NEWLINE || tok.kind == SPACE) {
            out += tok.text;
        } else if (target != TARGET_SIM && tok.kind == DIRECTIVE) {
            out += line_directive(tok.out);  // a .cu file is not preprocessor output
        } else {
            out += tok.out;
        }
    }
    out += generated;
    return true;
}

}  // namespace camel_sim
