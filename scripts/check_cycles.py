#!/usr/bin/env python3
"""Fails when the modules of crates/core import each other in a cycle.

Reads every `crate::…`, `super::…` and `self::…` path in crates/core/src
(in `use` lines and inline), resolves it to the module file it names and
builds the module dependency graph. Test code (`#[cfg(test)]` modules and
modules declared under a cfg with `test`) is left out: test helpers may
reach anywhere without shaping the production layering.

    scripts/check_cycles.py            exit 1 and name the cycle, if any
    scripts/check_cycles.py --graph    also print each module's dependencies
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "crates" / "core" / "src"
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
TEST_CFG = re.compile(r"#\[cfg\((?:any\()?[^\]]*(?<!not\()\btest\b[^\]]*\]\s*")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def matching_brace(text, open_at):
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def strip_test_code(text):
    """Removes `#[cfg(test)]` items; returns (text, names of test-only child modules)."""
    test_mods = set()
    out, pos = [], 0
    for m in TEST_CFG.finditer(text):
        if m.start() < pos:
            continue
        rest = text[m.end():]
        decl = re.match(r"(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*([;{])", rest)
        if not decl:
            continue
        out.append(text[pos:m.start()])
        if decl.group(2) == ";":
            test_mods.add(decl.group(1))
            pos = m.end() + decl.end()
        else:
            pos = matching_brace(text, m.end() + decl.end() - 1) + 1
    out.append(text[pos:])
    return "".join(out), test_mods


def split_group(body):
    items, depth, start = [], 0, 0
    for i, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    items.append(body[start:])
    return [s.strip() for s in items if s.strip()]


def paths_at(text, i, base):
    """Paths starting at text[i] (right after `crate::` etc.), as segment lists."""
    if i < len(text) and text[i] == "{":
        end = matching_brace(text, i)
        for item in split_group(text[i + 1:end]):
            yield from paths_at(item, 0, base)
        return
    m = re.match(IDENT + r"(?:\s*::\s*" + IDENT + r")*", text[i:])
    if not m:
        return
    segs = [s.strip() for s in m.group(0).split("::")]
    after = text[i + m.end():]
    group = re.match(r"\s*::\s*\{", after)
    if group:
        yield from paths_at(text, i + m.end() + group.end() - 1, base + segs)
    else:
        yield base + segs


def module_of(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return "::".join(parts)


def main():
    files = sorted(ROOT.rglob("*.rs"))
    modules = {module_of(f): f for f in files}
    texts, test_only = {}, set()
    for name, f in modules.items():
        text, test_mods = strip_test_code(strip_comments(f.read_text()))
        texts[name] = text
        for child in test_mods:
            test_only.add(f"{name}::{child}" if name else child)
    known = set(modules) - {""}

    def resolve(segs):
        while segs:
            cand = "::".join(segs)
            if cand in known:
                return cand
            segs = segs[:-1]
        return None

    deps = {m: set() for m in known if m not in test_only}
    for name, text in texts.items():
        if name in test_only or not name:
            continue
        parent = name.split("::")[:-1]
        for m in re.finditer(r"\b(crate|super|self)\s*::\s*", text):
            kind = m.group(1)
            base = {"crate": [], "super": parent, "self": name.split("::")}[kind]
            for segs in paths_at(text, m.end(), base):
                target = resolve(segs)
                if target and target != name and target not in test_only:
                    deps[name].add(target)

    cycles = strongly_connected(deps)
    if "--graph" in sys.argv:
        for name in sorted(deps):
            print(f"{name:<20} -> {', '.join(sorted(deps[name])) or '-'}")
    if cycles:
        for scc in cycles:
            print("import cycle among crates/core modules: " + " <-> ".join(sorted(scc)), file=sys.stderr)
        print("Move the shared piece into a lower module (error, names, shared_data, ...) "
              "so imports point one way.", file=sys.stderr)
        return 1
    print(f"crates/core: {len(deps)} modules, no import cycle")
    return 0


def strongly_connected(graph):
    """Tarjan's algorithm; returns the components with more than one module."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
