"""One rung's kernel as a learner reads it: ``bench matmul --source 6``, ``--diff 5 6``.

A ladder's rungs share code: v6-v9 are one template instantiated with other tile sizes, the
flash rungs are one template whose bool parameters switch the ideas on. `specialise()`
prints the source of ONE instantiation, as its own compilable MSL file:

1. the kernel and what it uses (helper functions, structs, #define constants), in file
   order, with the comment above each;
2. the template parameters replaced by the values of this instantiation (read from the
   `template [[host_name("...")]]` line after expanding the file's macros), the template
   renamed to the host name, `constexpr` sizes evaluated (`THREADS = 256;  // (BM / TM) ...`);
3. branches whose condition became a constant removed: `if (false) {...} else {...}`
   keeps the else, `if (true && x)` becomes `if (x)`, `true ? a : b` becomes `a`; a local
   declared without a value (`KvShare<2> next;`) that no remaining code names goes too.

The printed file compiles on its own (tests/test_bench_source.py runs it against NumPy),
so a diff of two rungs shows exactly what changed between them.
"""

from __future__ import annotations

import difflib
import re
from functools import partial
from pathlib import Path

SHADERS = Path(__file__).resolve().parents[2] / "shaders"
_WORD = re.compile(r"\b[A-Za-z_]\w*\b")


def _match(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket matching text[i] (== open_)."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"[source] unbalanced {open_!r} at offset {i}")


def _split_args(text: str) -> list[str]:
    """Split a macro's argument list on the commas outside parentheses."""
    args, depth, cur = [], 0, ""
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    args.append(cur.strip())
    return args


class Item:
    """One top-level piece of the file: a function, struct, #define or macro call."""

    def __init__(self, kind: str, name: str, text: str, comment: str):
        self.kind, self.name, self.text, self.comment = kind, name, text, comment

    def code(self) -> str:
        return re.sub(r"//[^\n]*", "", self.text)


def parse(text: str) -> list[Item]:
    """The top-level items of an MSL file, each with the comment block right above it."""
    lines = text.split("\n")
    items, comment, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s:
            comment = []
            i += 1
            continue
        if s.startswith("//"):
            comment.append(line)
            i += 1
            continue
        start = i
        if s.startswith("#"):
            while lines[i].rstrip().endswith("\\"):
                i += 1
            body = "\n".join(lines[start : i + 1])
            m = re.match(r"#define\s+(\w+)(\()?", s)
            if m:
                kind = "macro" if m.group(2) else "define"
                items.append(Item(kind, m.group(1), body, "\n".join(comment)))
            else:
                items.append(Item("preamble", s, body, "\n".join(comment)))
            comment = []
            i += 1
            continue
        # A declaration, definition or macro call: up to a ';' or '}' at depth 0, or a
        # top-level macro call's closing ')'.
        depth, opened, j = 0, False, i
        while True:
            for ch in re.sub(r"//.*", "", lines[j]):
                if ch in "{(":
                    depth += 1
                    opened = True
                elif ch in "})":
                    depth -= 1
            tail = re.sub(r"//.*", "", lines[j]).rstrip()
            if depth == 0 and (tail.endswith((";", "}")) or (opened and tail.endswith(")"))):
                break
            j += 1
        body = "\n".join(lines[start : j + 1])
        code = re.sub(r"//[^\n]*", "", body)
        if m := re.match(r"\s*(?:template\s*<[^>]*>\s*)?struct\s+(\w+)", code):
            kind, name = "struct", m.group(1)
        elif re.match(r"\s*using\b", code):
            kind, name = "preamble", code.strip()
        elif m := re.match(r"\s*([A-Z_][A-Z0-9_]*)\s*\(", code):
            kind, name = "call", m.group(1)
        else:
            m = re.search(r"(\w+)\s*\(", code)
            kind, name = "function", m.group(1) if m else code.strip()
        items.append(Item(kind, name, body, "\n".join(comment)))
        comment = []
        i = j + 1
    return items


def _expand(call: str, macros: dict[str, Item], depth: int = 0) -> str:
    """Expand function-like macros in `call` (argument substitution, #stringify)."""
    if depth > 8:
        return call
    out, pos = "", 0
    for m in re.finditer(r"\b([A-Z_][A-Z0-9_]*)\s*\(", call):
        if m.start() < pos or m.group(1) not in macros:
            continue
        end = _match(call, m.end() - 1, "(", ")")
        args = _split_args(call[m.end() : end - 1])
        d = macros[m.group(1)].text.replace("\\\n", "\n")
        dm = re.match(r"#define\s+\w+\(([^)]*)\)(.*)", d, re.S)
        params = [p.strip() for p in dm.group(1).split(",")]
        body = dm.group(2)
        for p, a in zip(params, args, strict=False):  # extra args: __VA_ARGS__ unused
            body = re.sub(r"#\s*" + p + r"\b", '"' + a.strip('"') + '"', body)
            body = re.sub(r"\b" + p + r"\b", a, body)
        out += call[pos : m.start()] + _expand(body, macros, depth + 1)
        pos = end
    return out + call[pos:]


def instantiations(text: str) -> dict[str, tuple[str, list[str]]]:
    """host name -> (template name, template arguments) for every explicit instantiation."""
    items = parse(text)
    macros = {it.name: it for it in items if it.kind == "macro"}
    found = {}
    for it in items:
        if it.kind != "call":
            continue
        expanded = _expand(it.code(), macros)
        pattern = (
            r"template\s*\[\[host_name\(((?:\s*\"[^\"]*\")+)\s*\)\]\]\s*kernel\s+void\s+(\w+)\s*<"
        )
        for m in re.finditer(pattern, expanded):
            host = "".join(re.findall(r'"([^"]*)"', m.group(1)))
            end = _match(expanded, m.end() - 1, "<", ">")
            found[host] = (m.group(2), _split_args(expanded[m.end() : end - 1]))
    return found


def _eval_const(expr: str):
    """The value of a constant integer or bool expression (C semantics), or None."""
    e = expr.strip()
    if not re.fullmatch(r"[\d\s+\-*/%()<>=!&|?:uUtruefals]+", e):
        return None
    e = re.sub(r"(\d+)[uU]\b", r"\1", e)
    e = e.replace("&&", " and ").replace("||", " or ").replace("/", "//")
    e = re.sub(r"!(?!=)", " not ", e).replace("true", "True").replace("false", "False")
    # a ? b : c  ->  (b if a else c), for one unnested ternary
    if "?" in e:
        m = re.fullmatch(r"(.+?)\?(.+?):(.+)", e)
        if not m or "?" in m.group(2) + m.group(3):
            return None
        e = f"(({m.group(2)}) if ({m.group(1)}) else ({m.group(3)}))"
    try:
        return eval(e, {"__builtins__": {}}, {})  # digits, operators and True/False only
    except Exception:
        return None


def _simplify_cond(cond: str) -> str:
    """Drop constant terms of a pure && or || chain: 'true && x' -> 'x', 'false && x' -> 'false'."""
    c = cond.strip()
    value = _eval_const(c)
    if isinstance(value, bool):
        return "true" if value else "false"
    for op, absorbing, neutral in (("&&", "false", "true"), ("||", "true", "false")):
        other = "||" if op == "&&" else "&&"
        if op not in c or other in c:
            continue
        terms, depth, cur = [], 0, ""
        k = 0
        while k < len(c):
            ch = c[k]
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and c.startswith(op, k):
                terms.append(cur.strip())
                cur, k = "", k + 2
                continue
            cur += ch
            k += 1
        terms.append(cur.strip())
        kept = []
        for t in terms:
            v = _eval_const(t)
            if isinstance(v, bool):
                if (v and absorbing == "true") or (not v and absorbing == "false"):
                    return absorbing
                continue  # the neutral constant drops out
            kept.append(t)
        return f" {op} ".join(kept) if kept else neutral
    return c


def _dedent_block(block: str) -> str:
    """The inside of '{ ... }' as statements one level (4 spaces) further out."""
    lines = block[1:-1].strip("\n").split("\n")
    out = [ln[4:] if ln.startswith("    ") else ln.lstrip() for ln in lines]
    return "\n".join(ln.rstrip() for ln in out).strip()


def _statement_end(text: str, i: int) -> int:
    """End of the statement starting at text[i]: a {...} block or up to its ';'."""
    if text[i] == "{":
        return _match(text, i, "{", "}")
    depth = 0
    for j in range(i, len(text)):
        depth += text[j] in "({["
        depth -= text[j] in ")}]"
        if text[j] == ";" and depth == 0:
            return j + 1
    return len(text)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n":
        i += 1
    return i


def _chain(text: str, at: int):
    """Parse the if / else if / else chain at text[at]: ([(cond, body)], else_body, end)."""
    links, else_body, i = [], None, at
    while True:
        close = _match(text, text.index("(", i), "(", ")")
        cond = text[text.index("(", i) + 1 : close - 1]
        b_at = _skip_ws(text, close)
        b_end = _statement_end(text, b_at)
        links.append((cond, text[b_at:b_end]))
        end = b_end
        nxt = _skip_ws(text, b_end)
        if not (text.startswith("else", nxt) and not text[nxt + 4 : nxt + 5].isalnum()):
            return links, else_body, end
        e_at = _skip_ws(text, nxt + 4)
        if re.match(r"if\s*\(", text[e_at:]):
            i = e_at
            continue
        e_end = _statement_end(text, e_at)
        return links, text[e_at:e_end], e_end


def _body(stmt: str) -> str:
    return _dedent_block(stmt) if stmt.startswith("{") else stmt


def fold_ifs(text: str) -> str:
    """Remove the branches of if chains whose condition is now a constant."""
    pos = 0
    while m := re.compile(r"\bif\s*\(").search(text, pos):
        if re.search(r"\belse\s*$", text[: m.start()]):
            pos = m.end()
            continue
        links, else_body, end = _chain(text, m.start())
        kept, final = [], else_body
        for cond, body in links:
            c = _simplify_cond(cond)
            if c == "false":
                continue
            if c == "true":
                final = body
                break
            kept.append((c, body))
        if [c for c, _ in kept] == [c.strip() for c, _ in links] and final is else_body:
            pos = m.end()  # nothing constant in this chain
            continue
        if not kept:
            repl = _body(final) if final is not None else ""
        else:
            repl = " else ".join(f"if ({c}) {b}" for c, b in kept)
            if final is not None:
                repl += f" else {final}"
        if repl:
            text = text[: m.start()] + repl + text[end:]
        else:  # drop the line the if stood on
            text = text[: text.rfind("\n", 0, m.start())] + text[end:]
        pos = m.start()
    return text


def fold_ternaries(text: str) -> str:
    """'true ? a : b' -> 'a' and 'false ? a : b' -> 'b' (with the condition a literal)."""
    while m := re.search(r"(?<![\w.])(!?)(true|false)\s*\?", text):
        value = (m.group(2) == "true") != (m.group(1) == "!")
        i, depth, colon = m.end(), 0, None
        while i < len(text):
            ch = text[i]
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and ch == "?":
                depth += 100  # a nested ternary: its ':' is not ours
            elif depth >= 100 and ch == ":":
                depth -= 100
            elif depth == 0 and ch == ":" and colon is None:
                colon = i
            elif depth == 0 and ch in ";," and colon is not None:
                break
            i += 1
        if colon is None:
            break
        pick = text[m.end() : colon] if value else text[colon + 1 : i]
        text = text[: m.start()] + pick.strip() + text[i:]
    return text


_DECL = re.compile(r"^[ \t]+(?!return\b)[A-Za-z_][^;=\n]*?[\w>][ \t]+(\w+);[ \t]*(?://.*)?\n", re.M)


def drop_unused_locals(text: str) -> str:
    """Remove declarations without a value ('    KvShare<f<4>()> next;') of names that no
    other code (comments aside) mentions: what a removed branch was the only user of."""
    code = re.sub(r"//[^\n]*", "", text)
    for m in reversed(list(_DECL.finditer(text))):
        if len(re.findall(r"\b" + m.group(1) + r"\b", code)) == 1:
            text = text[: m.start()] + text[m.end() :]
    return text


_CONSTEXPR = re.compile(r"(constexpr\s+(?:uint|int)\s+)(\w+)\s*=\s*([^;]+);([ \t]*//(.*))?")


def fold_constexpr(text: str, known: dict[str, int]) -> str:
    """'constexpr uint THREADS = (BM / TM) * (BN / TN);' -> '... = 256;  // (BM / TM) * ...'
    where every name in the expression has a value in `known` (which learns the result)."""

    def one(m):
        expr = m.group(3)
        names = set(_WORD.findall(expr)) - {"true", "false", "u", "U"}
        names = {n for n in names if not re.fullmatch(r"\d+[uU]?", n)}
        if not names or not names <= known.keys() or "?" in expr:
            return m.group(0)  # a ternary is fold_ternaries' (its text in a note would not be)
        value = _eval_const(_substitute(expr, {n: str(known[n]) for n in names}))
        if value is None or isinstance(value, bool):
            return m.group(0)
        known[m.group(2)] = int(value)
        note = f"  // {expr.strip()}" + (f";{m.group(5)}" if m.group(5) else "")
        return f"{m.group(1)}{m.group(2)} = {int(value)};{note}"

    return _CONSTEXPR.sub(one, text)


_ARITH = re.compile(r"(?:(?<=[\[(])|(?<=[<=] ))(\d+) ([*/%+-]) (\d+)(?=([\]);,]| [+-] )?)")


def fold_arith(text: str) -> str:
    """Evaluate literal products and sums where precedence allows: '< 16 / 8;' -> '< 2;'."""

    def one(m):
        a, op, b, after = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if op in "+-" and after is None:
            return m.group(0)  # '64 + 8 * x': the product binds first
        if op in "/%" and b == 0:
            return m.group(0)
        value = {"*": a * b, "/": a // b, "%": a % b, "+": a + b, "-": a - b}[op]
        return str(value) if value >= 0 else m.group(0)

    while True:
        new = re.sub(r"(?<![\w\]])\((\d+)\)", r"\1", _ARITH.sub(one, text))
        if new == text:
            return text
        text = new


def _substitute(code: str, subs: dict[str, str]) -> str:
    for n, v in subs.items():
        code = re.sub(r"\b" + n + r"\b", v, code)
    return code


def _in_code(text: str, fn) -> str:
    """Apply fn to the code of each line, not to its // comment (comments keep the names)."""
    out = []
    for line in text.split("\n"):
        code, sep, comment = line.partition("//")
        out.append(fn(code) + sep + comment)
    return "\n".join(out)


def _rename(body: str, old: str, new: str) -> str:
    """Rename the function and keep its parameter lines aligned under the '('."""
    m = re.search(r"\b" + old + r"\s*\(", body)
    col = m.end() - (body.rfind("\n", 0, m.start()) + 1)
    sig_end = body.index("{", m.end())
    sig = body[:sig_end].replace("\n" + " " * col, "\n" + " " * (col + len(new) - len(old)))
    sig = sig[: m.start()] + new + sig[m.start() + len(old) :]
    return sig + body[sig_end:]


def specialise(shader: str, host_name: str, header: str = "") -> str:
    """The MSL of one kernel of shaders/<shader>, standalone and specialised (see above)."""
    text = (SHADERS / shader).read_text()
    items = parse(text)
    inst = instantiations(text)
    by_name = {}
    for it in items:
        if it.kind in ("function", "struct", "define"):
            by_name.setdefault(it.name, it)
    subs: dict[str, str] = {}
    types: dict[str, str] = {}
    if host_name in inst:
        template, values = inst[host_name]
        root = by_name[template]
        head = re.match(r"\s*template\s*<([^>]*)>", root.code())
        decls = [p.split() for p in head.group(1).split(",")]
        names = [d[-1] for d in decls]
        types = {d[-1]: " ".join(d[:-1]) for d in decls}
        subs = dict(zip(names, values, strict=True))
        title = f"{template}<{', '.join(f'{n} = {v}' for n, v in subs.items())}>"
    elif host_name in by_name:
        root, template, title = by_name[host_name], host_name, host_name
    else:
        kernels = sorted(set(inst) | {it.name for it in items if "kernel" in it.code()})
        raise ValueError(f"[source] no kernel {host_name!r} in {shader}; kernels: {kernels}")

    root_body = root.text
    if subs:
        root_body = re.sub(r"^\s*template\s*<[^>]*>\s*\n?", "", root_body, count=1)
        root_body = _rename(root_body, template, host_name)
        # bool flags become literals (and their dead branches go); sizes become
        # constants at the top of the body, so the code keeps its names and types
        flags = {n: v for n, v in subs.items() if v in ("true", "false")}
        sizes = {n: v for n, v in subs.items() if n not in flags}
        root_body = _in_code(root_body, partial(_substitute, subs=flags))
        brace = root_body.index("{", root_body.index(host_name)) + 1
        decl = "".join(f"\n    constexpr {types[n]} {n} = {v};  // template parameter"
                       for n, v in sizes.items())  # fmt: skip
        root_body = root_body[:brace] + decl + root_body[brace:]
        known = {n: int(v.rstrip("uU")) for n, v in sizes.items() if v.isdigit()}
        root_body = fold_ifs(fold_ternaries(fold_constexpr(root_body, known)))
        root_body = drop_unused_locals(root_body)

    # what the specialised kernel still uses, transitively (dead branches' helpers go too)
    wanted, todo = {root.name}, [re.sub(r"//[^\n]*", "", root_body)]
    while todo:
        for w in set(_WORD.findall(todo.pop())):
            if w in by_name and w not in wanted:
                wanted.add(w)
                todo.append(by_name[w].code())
    out = []
    for it in items:
        if it.kind == "preamble" or (it.name in wanted and by_name.get(it.name) is it):
            body = root_body if it is root else it.text
            out.append((it.comment + "\n" if it.comment else "") + body)
    note = f"// {host_name}: {title}, from shaders/{shader}"
    if subs:
        note += "\n// (template parameters as constants, bool flags substituted, dead code removed)"
    return "\n".join(filter(None, [header, note])) + "\n\n" + "\n\n".join(out) + "\n"


def diff(a: str, b: str, name_a: str, name_b: str) -> str:
    """A unified diff of two specialised sources."""
    lines = difflib.unified_diff(a.splitlines(), b.splitlines(), name_a, name_b, lineterm="", n=3)
    return "\n".join(lines) + "\n"
