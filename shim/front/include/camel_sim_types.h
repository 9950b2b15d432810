// camel_sim_types.h — the parts of MSL that real projects use beyond the basics
// of camel_sim_msl.h (which includes this file inside namespace metal):
//   - type traits (<metal_type_traits>): is_same_v, enable_if_t, is_floating_point_v, ...
//   - matrix types float2x2 ... half4x4: columns of vectors, column-major as in MSL
//   - uniform<T> and make_uniform (a value the same for every thread)
//   - bfloat and bfloat2/3/4 (MSL 3.1), simulator only: clang's __bf16
// Plain C++17, no standard library; shared with the CUDA shim except bfloat.

// ---------------------------------------------------------------------------
// Type traits. Metal's are those of C++17 <type_traits> in namespace metal, with
// half (and bfloat) counted as floating-point types, and is_vector/vec_elements.
// ---------------------------------------------------------------------------
template <class T, T V> struct integral_constant {
    static constexpr T value = V;
    typedef T value_type;
    typedef integral_constant type;
    constexpr operator T() const { return V; }
    constexpr T operator()() const { return V; }
};
template <bool B> using bool_constant = integral_constant<bool, B>;
typedef bool_constant<true> true_type;
typedef bool_constant<false> false_type;

template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <bool B, class T = void> using enable_if_t = typename enable_if<B, T>::type;
template <bool B, class T, class F> struct conditional { typedef T type; };
template <class T, class F> struct conditional<false, T, F> { typedef F type; };
template <bool B, class T, class F> using conditional_t = typename conditional<B, T, F>::type;
template <class...> using void_t = void;

template <class A, class B> struct is_same : false_type {};
template <class A> struct is_same<A, A> : true_type {};
template <class A, class B> constexpr bool is_same_v = is_same<A, B>::value;

template <class T> struct remove_const { typedef T type; };
template <class T> struct remove_const<const T> { typedef T type; };
template <class T> struct remove_volatile { typedef T type; };
template <class T> struct remove_volatile<volatile T> { typedef T type; };
template <class T> struct remove_cv { typedef typename remove_volatile<typename remove_const<T>::type>::type type; };
template <class T> struct remove_reference { typedef T type; };
template <class T> struct remove_reference<T &> { typedef T type; };
template <class T> struct remove_reference<T &&> { typedef T type; };
template <class T> struct remove_pointer { typedef T type; };
template <class T> struct remove_pointer<T *> { typedef T type; };
template <class T> struct remove_pointer<T *const> { typedef T type; };
template <class T> struct add_const { typedef const T type; };
template <class T> struct add_pointer { typedef typename remove_reference<T>::type *type; };
template <class T> using remove_const_t = typename remove_const<T>::type;
template <class T> using remove_volatile_t = typename remove_volatile<T>::type;
template <class T> using remove_cv_t = typename remove_cv<T>::type;
template <class T> using remove_reference_t = typename remove_reference<T>::type;
template <class T> using remove_pointer_t = typename remove_pointer<T>::type;
template <class T> using add_const_t = typename add_const<T>::type;
template <class T> using add_pointer_t = typename add_pointer<T>::type;
template <class T> struct remove_cvref { typedef remove_cv_t<remove_reference_t<T>> type; };
template <class T> using remove_cvref_t = typename remove_cvref<T>::type;
template <class T> struct decay { typedef remove_cvref_t<T> type; };
template <class T> using decay_t = typename decay<T>::type;

// Scalar categories, by the type without const/volatile.
template <class T> struct __camel_integral : false_type {};
#define __CAMEL_INTEGRAL(T) template <> struct __camel_integral<T> : true_type {};
__CAMEL_INTEGRAL(bool) __CAMEL_INTEGRAL(char) __CAMEL_INTEGRAL(signed char)
__CAMEL_INTEGRAL(unsigned char) __CAMEL_INTEGRAL(short) __CAMEL_INTEGRAL(unsigned short)
__CAMEL_INTEGRAL(int) __CAMEL_INTEGRAL(unsigned int) __CAMEL_INTEGRAL(long)
__CAMEL_INTEGRAL(unsigned long) __CAMEL_INTEGRAL(long long) __CAMEL_INTEGRAL(unsigned long long)
#undef __CAMEL_INTEGRAL
template <class T> struct __camel_floating : false_type {};
template <> struct __camel_floating<float> : true_type {};
template <> struct __camel_floating<half> : true_type {};
#if !defined(__CAMEL_CUDA__)
template <> struct __camel_floating<__bf16> : true_type {};
#endif
template <class T> struct is_integral : __camel_integral<remove_cv_t<T>> {};
template <class T> struct is_floating_point : __camel_floating<remove_cv_t<T>> {};
template <class T> struct is_arithmetic : bool_constant<is_integral<T>::value || is_floating_point<T>::value> {};
template <class T> struct is_signed : bool_constant<is_floating_point<T>::value ||
                                                    (is_integral<T>::value && (remove_cv_t<T>)-1 < (remove_cv_t<T>)0)> {};
template <class T> struct is_unsigned : bool_constant<is_integral<T>::value && !is_signed<T>::value> {};
template <class T> struct is_void : is_same<remove_cv_t<T>, void> {};
template <class T> struct is_const : false_type {};
template <class T> struct is_const<const T> : true_type {};
template <class T> struct is_volatile : false_type {};
template <class T> struct is_volatile<volatile T> : true_type {};
template <class T> struct is_pointer : __camel_is_ptr<remove_cv_t<T>> {};
template <class T> struct is_reference : false_type {};
template <class T> struct is_reference<T &> : true_type {};
template <class T> struct is_reference<T &&> : true_type {};
template <class T> struct is_array : false_type {};
template <class T> struct is_array<T[]> : true_type {};
template <class T, size_t N> struct is_array<T[N]> : true_type {};
template <class T> struct is_enum : bool_constant<__is_enum(T)> {};
template <class T> struct is_class : bool_constant<__is_class(T)> {};
template <class T> struct is_union : bool_constant<__is_union(T)> {};
template <class T> struct is_empty : bool_constant<__is_empty(T)> {};
template <class T> struct is_trivially_copyable : bool_constant<__is_trivially_copyable(T)> {};
template <class B, class D> struct is_base_of : bool_constant<__is_base_of(B, D)> {};
template <class F, class T> struct is_convertible : bool_constant<__is_convertible_to(F, T)> {};
// MSL: a vector type, and the number of its components (1 for a scalar)
template <class T> struct is_vector : bool_constant<(__camel_vt<remove_cv_t<T>>::n > 1)> {};
template <class T> struct vec_elements : integral_constant<int, __camel_vt<remove_cv_t<T>>::n> {};
template <class T> struct is_scalar : bool_constant<is_arithmetic<T>::value || is_enum<T>::value ||
                                                    is_pointer<T>::value> {};

template <class T> constexpr bool is_integral_v = is_integral<T>::value;
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> constexpr bool is_signed_v = is_signed<T>::value;
template <class T> constexpr bool is_unsigned_v = is_unsigned<T>::value;
template <class T> constexpr bool is_void_v = is_void<T>::value;
template <class T> constexpr bool is_const_v = is_const<T>::value;
template <class T> constexpr bool is_volatile_v = is_volatile<T>::value;
template <class T> constexpr bool is_pointer_v = is_pointer<T>::value;
template <class T> constexpr bool is_reference_v = is_reference<T>::value;
template <class T> constexpr bool is_array_v = is_array<T>::value;
template <class T> constexpr bool is_enum_v = is_enum<T>::value;
template <class T> constexpr bool is_class_v = is_class<T>::value;
template <class T> constexpr bool is_union_v = is_union<T>::value;
template <class T> constexpr bool is_empty_v = is_empty<T>::value;
template <class T> constexpr bool is_trivially_copyable_v = is_trivially_copyable<T>::value;
template <class B, class D> constexpr bool is_base_of_v = is_base_of<B, D>::value;
template <class F, class T> constexpr bool is_convertible_v = is_convertible<F, T>::value;
template <class T> constexpr bool is_vector_v = is_vector<T>::value;
template <class T> constexpr bool is_scalar_v = is_scalar<T>::value;

template <class...> struct conjunction : true_type {};
template <class B, class... R> struct conjunction<B, R...> : bool_constant<B::value && conjunction<R...>::value> {};
template <class...> struct disjunction : false_type {};
template <class B, class... R> struct disjunction<B, R...> : bool_constant<B::value || disjunction<R...>::value> {};
template <class B> struct negation : bool_constant<!B::value> {};
template <class... B> constexpr bool conjunction_v = conjunction<B...>::value;
template <class... B> constexpr bool disjunction_v = disjunction<B...>::value;
template <class B> constexpr bool negation_v = negation<B>::value;

template <class T> struct make_unsigned { typedef T type; };
template <class T> struct make_signed { typedef T type; };
#define __CAMEL_SIGNS(S, U)                                                         \
    template <> struct make_unsigned<S> { typedef U type; };                        \
    template <> struct make_unsigned<U> { typedef U type; };                        \
    template <> struct make_signed<S> { typedef S type; };                          \
    template <> struct make_signed<U> { typedef S type; };
__CAMEL_SIGNS(signed char, unsigned char) __CAMEL_SIGNS(short, unsigned short)
__CAMEL_SIGNS(int, unsigned int) __CAMEL_SIGNS(long, unsigned long)
#undef __CAMEL_SIGNS
template <> struct make_unsigned<char> { typedef unsigned char type; };
template <> struct make_signed<char> { typedef signed char type; };
template <class T> using make_unsigned_t = typename make_unsigned<T>::type;
template <class T> using make_signed_t = typename make_signed<T>::type;

template <class T> T &&__camel_declval() noexcept;
template <class T> struct underlying_type { typedef __underlying_type(T) type; };
template <class T> using underlying_type_t = typename underlying_type<T>::type;

// ---------------------------------------------------------------------------
// Matrices: floatCxR / halfCxR, C columns of R-component vectors (column-major:
// m[i] is column i). m * v, v * m, m * m, scalar products, sums, transpose,
// determinant; constructors from a scalar (the diagonal), from C columns, from
// C * R scalars in column order, and from a matrix of the other element type.
// ---------------------------------------------------------------------------
template <class T, int C, int R> struct matrix {
    static_assert(__camel_same<T, float>::value || __camel_same<T, half>::value,
                  "MSL: matrix elements are float or half");
    static_assert(C >= 2 && C <= 4 && R >= 2 && R <= 4, "MSL: matrices are 2x2 to 4x4");
    typedef vec<T, R> column;
    column columns[C];

    matrix() : columns{} {}
    explicit matrix(T diagonal) : columns{} {
        for (int i = 0; i < (C < R ? C : R); i++) columns[i][i] = diagonal;
    }
    template <class U> explicit matrix(const matrix<U, C, R> &m) {
        for (int i = 0; i < C; i++) columns[i] = __builtin_convertvector(m.columns[i], column);
    }
    // C columns, or C * R scalars (column by column)
    template <class A0, class... A,
              class = typename __camel_enable_if<(sizeof...(A) == C - 1) || (sizeof...(A) == C * R - 1)>::type>
    matrix(A0 a0, A... a) {
        if constexpr (sizeof...(A) == C - 1) {
            column cols[C] = {column(a0), column(a)...};
            for (int i = 0; i < C; i++) columns[i] = cols[i];
        } else {
            T s[C * R] = {(T)a0, (T)a...};
            for (int i = 0; i < C; i++)
                for (int j = 0; j < R; j++) columns[i][j] = s[i * R + j];
        }
    }
    column &operator[](int i) { return columns[i]; }
    const column &operator[](int i) const { return columns[i]; }

    matrix &operator+=(const matrix &b) { return *this = *this + b; }
    matrix &operator-=(const matrix &b) { return *this = *this - b; }
    matrix &operator*=(__camel_identity_t<T> s) { return *this = *this * s; }
    matrix &operator*=(const matrix<T, C, C> &b) { return *this = *this * b; }

    friend matrix operator+(const matrix &a, const matrix &b) {
        matrix r;
        for (int i = 0; i < C; i++) r.columns[i] = a.columns[i] + b.columns[i];
        return r;
    }
    friend matrix operator-(const matrix &a, const matrix &b) {
        matrix r;
        for (int i = 0; i < C; i++) r.columns[i] = a.columns[i] - b.columns[i];
        return r;
    }
    friend matrix operator-(const matrix &a) {
        matrix r;
        for (int i = 0; i < C; i++) r.columns[i] = -a.columns[i];
        return r;
    }
    friend matrix operator*(const matrix &a, __camel_identity_t<T> s) {
        matrix r;
        for (int i = 0; i < C; i++) r.columns[i] = a.columns[i] * s;
        return r;
    }
    friend matrix operator*(__camel_identity_t<T> s, const matrix &a) { return a * s; }
    // m * v: the columns weighted by the components of v (a vector of R)
    friend column operator*(const matrix &m, vec<T, C> v) {
        column r = m.columns[0] * v[0];
        for (int i = 1; i < C; i++) r += m.columns[i] * v[i];
        return r;
    }
    // v * m: one dot product per column (a vector of C)
    friend vec<T, C> operator*(column v, const matrix &m) {
        vec<T, C> r;
        for (int i = 0; i < C; i++) {
            column p = v * m.columns[i];
            T s = p[0];
            for (int j = 1; j < R; j++) s += p[j];
            r[i] = s;
        }
        return r;
    }
    template <int K> friend matrix<T, K, R> operator*(const matrix &a, const matrix<T, K, C> &b) {
        matrix<T, K, R> r;
        for (int k = 0; k < K; k++) r.columns[k] = a * b.columns[k];
        return r;
    }
    friend bool operator==(const matrix &a, const matrix &b) {
        for (int i = 0; i < C; i++)
            for (int j = 0; j < R; j++)
                if (a.columns[i][j] != b.columns[i][j]) return false;
        return true;
    }
    friend bool operator!=(const matrix &a, const matrix &b) { return !(a == b); }
};

template <class T, int C, int R> inline matrix<T, R, C> transpose(const matrix<T, C, R> &m) {
    matrix<T, R, C> t;
    for (int i = 0; i < C; i++)
        for (int j = 0; j < R; j++) t.columns[j][i] = m.columns[i][j];
    return t;
}
template <class T> inline T determinant(const matrix<T, 2, 2> &m) {
    return m[0][0] * m[1][1] - m[1][0] * m[0][1];
}
template <class T> inline T determinant(const matrix<T, 3, 3> &m) {
    return m[0][0] * (m[1][1] * m[2][2] - m[2][1] * m[1][2]) -
           m[1][0] * (m[0][1] * m[2][2] - m[2][1] * m[0][2]) +
           m[2][0] * (m[0][1] * m[1][2] - m[1][1] * m[0][2]);
}
template <class T> inline T determinant(const matrix<T, 4, 4> &m) {
    T d = 0;  // expansion along the first column, with 3x3 minors
    for (int i = 0; i < 4; i++) {
        matrix<T, 3, 3> minor;
        for (int c = 1; c < 4; c++)
            for (int r = 0, rr = 0; r < 4; r++)
                if (r != i) minor.columns[c - 1][rr++] = m.columns[c][r];
        T term = m.columns[0][i] * determinant(minor);
        d += (i % 2) ? -term : term;
    }
    return d;
}

#define __CAMEL_MATRICES(T)                                                                    \
    typedef matrix<T, 2, 2> T##2x2; typedef matrix<T, 2, 3> T##2x3; typedef matrix<T, 2, 4> T##2x4; \
    typedef matrix<T, 3, 2> T##3x2; typedef matrix<T, 3, 3> T##3x3; typedef matrix<T, 3, 4> T##3x4; \
    typedef matrix<T, 4, 2> T##4x2; typedef matrix<T, 4, 3> T##4x3; typedef matrix<T, 4, 4> T##4x4;
__CAMEL_MATRICES(float)
__CAMEL_MATRICES(half)
#undef __CAMEL_MATRICES

// ---------------------------------------------------------------------------
// uniform<T>: a value known to be the same in every thread (a hint to Apple's
// compiler). Here a wrapper that converts to and from T.
// ---------------------------------------------------------------------------
template <class T> struct uniform {
    T __value;
    uniform() = default;
    uniform(T v) : __value(v) {}
    operator T() const { return __value; }
    uniform &operator=(T v) {
        __value = v;
        return *this;
    }
};
template <class T> inline uniform<T> make_uniform(T v) { return uniform<T>(v); }

// ---------------------------------------------------------------------------
// {a, b} passed to a vector parameter: f({1.0f, 2.0f}). clang cannot convert a
// braced list to a vector argument, so the translator writes __camel_list(a, b),
// which converts to any vector with that many components.
// ---------------------------------------------------------------------------
template <class... A> struct __camel_list_t;
template <> struct __camel_list_t<> {
    static constexpr int n = 0;
    template <class V> void put(V &, int &) const {}
    template <class V, class... D> V make(D... d) const { return V{d...}; }
};
template <class H, class... R> struct __camel_list_t<H, R...> {
    static constexpr int n = __camel_vt<H>::n + __camel_list_t<R...>::n;
    H h;
    __camel_list_t<R...> r;
    __camel_list_t(H a, R... b) : h(a), r(b...) {}
    template <class V> void put(V &v, int &i) const {
        __camel_put(v, i, h);
        r.put(v, i);
    }
    template <class V, class... D> V make(D... d) const { return r.template make<V>(d..., h); }
    template <class V, class = typename __camel_enable_if<(__camel_vt<V>::n == n && n > 1)>::type>
    operator V() const {
        V v{};
        int i = 0;
        put(v, i);
        return v;
    }
    // a struct parameter, as the braces would have built it: f({1, 2}) with f(Pair)
    template <class V, class = typename __camel_enable_if<(__is_class(V) || __is_union(V)) &&
                                                         !__camel_is_boolvec<V>::value>::type,
              class = void>
    operator V() const {
        return make<V>();
    }
};
template <class... A> inline __camel_list_t<A...> __camel_list(A... a) { return __camel_list_t<A...>(a...); }

// ---------------------------------------------------------------------------
// bfloat (MSL 3.1): 1 sign, 8 exponent and 7 mantissa bits. clang's __bf16,
// each operation rounded to bfloat (-fbfloat16-excess-precision=none).
// The CUDA shim does not have it.
// ---------------------------------------------------------------------------
#if !defined(__CAMEL_CUDA__)
#define __HAVE_BFLOAT__ 1
// float -> bfloat, round to nearest even (NaN stays NaN). clang calls this
// compiler-rt routine for every conversion; the C runtime here may lack it.
extern "C" __attribute__((weak, visibility("hidden"))) __bf16 __truncsfbf2(float f) {
    unsigned u = __builtin_bit_cast(unsigned, f);
    unsigned short b = (u & 0x7fffffffu) > 0x7f800000u
                           ? (unsigned short)((u >> 16) | 0x40u)
                           : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return __builtin_bit_cast(__bf16, b);
}
typedef __bf16 bfloat;
typedef __bf16 bfloat2 __attribute__((ext_vector_type(2)));
typedef __bf16 bfloat3 __attribute__((ext_vector_type(3)));
typedef __bf16 bfloat4 __attribute__((ext_vector_type(4)));
template <> struct numeric_limits<bfloat> {
    static constexpr bool is_specialized = true;
    static constexpr bool is_signed = true;
    static constexpr bool is_integer = false;
    static constexpr int digits = 8;
    static constexpr bfloat min() { return (bfloat)0x1.0p-126f; }
    static constexpr bfloat lowest() { return -(bfloat)0x1.fep+127f; }
    static constexpr bfloat max() { return (bfloat)0x1.fep+127f; }
    static constexpr bfloat epsilon() { return (bfloat)0x1.0p-7f; }
    static constexpr bfloat infinity() { return (bfloat)__builtin_inff(); }
    static constexpr bfloat quiet_NaN() { return (bfloat)__builtin_nanf(""); }
};
#endif
