#!/usr/bin/env python3
"""Fails when modules of one crate import each other in a cycle (tests aside).

For every `crate::a::b` (and `super::…`) path in a file, the edge runs between the two
sibling modules where the file's module path and the named path part; a path into an
ancestor or a descendant is no edge. Cycles among siblings are reported with their
members. Usage: check-cycles.py [CRATE_SRC_DIR ...] (default: every workspace crate).
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)((?:::\w+)+)")
USE_GROUP = re.compile(r"\buse\s+(crate|super)((?:::\w+)*)::\{([^;]*?)\};", re.S)


def module_path(src: Path, file: Path) -> list:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def resolve(mod: list, root: str, rest: list, is_mod_rs: bool) -> list:
    if root == "crate":
        return rest
    # `super` in a mod.rs/inline file is relative to the module itself.
    base = mod[:-1]
    while rest and rest[0] == "super":
        base = base[:-1]
        rest = rest[1:]
    return base + rest


def edges_of(src: Path, known: set):
    for file in sorted(src.rglob("*.rs")):
        mod = module_path(src, file)
        if "tests" in mod:
            continue  # a test module may use anything; nothing uses it but tests
        text = re.sub(r"//[^\n]*", "", file.read_text())
        # Inline unit tests (`#[cfg(test)] mod tests {`) come last in a file.
        text = re.split(r"#\[cfg\(test\)\]\s*mod \w+\s*\{", text)[0]
        refs = []
        for m in USE_GROUP.finditer(text):
            head = [p for p in m.group(2).split("::") if p]
            for item in re.split(r"[,\s]+", m.group(3)):
                item = item.split("::")[0].strip("{} ")
                if item and item != "self":
                    refs.append((m.group(1), head + [item]))
                elif item == "self":
                    refs.append((m.group(1), head))
        for m in PATH.finditer(text):
            refs.append((m.group(1), [p for p in m.group(2).split("::") if p]))
        for root, rest in refs:
            target = resolve(mod, root, rest, file.name == "mod.rs")
            # Keep only the part that names modules.
            while target and tuple(target) not in known:
                target = target[:-1]
            i = 0
            while i < len(mod) and i < len(target) and mod[i] == target[i]:
                i += 1
            if i < len(mod) and i < len(target):
                yield tuple(mod[:i]), mod[i], target[i], file


def cycles(graph: dict):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def check(src: Path) -> int:
    known = {tuple(module_path(src, f)) for f in src.rglob("*.rs")}
    # Directories of mod.rs-less modules and inline `mod x {` are not tracked.
    graphs = {}
    for parent, a, b, _ in edges_of(src, known):
        graphs.setdefault(parent, {}).setdefault(a, set()).add(b)
    bad = 0
    for parent, graph in sorted(graphs.items()):
        for comp in cycles(graph):
            where = "::".join(parent) or "crate"
            print(f"{src}: import cycle in {where}: {' <-> '.join(comp)}")
            bad += 1
    return bad


def main() -> int:
    roots = [Path(a) for a in sys.argv[1:]]
    if not roots:
        top = Path(__file__).resolve().parent.parent
        roots = sorted(p.parent for p in top.glob("*/src/lib.rs")) + sorted(
            p.parent for p in top.glob("*/src/main.rs") if not (p.parent / "lib.rs").exists()
        )
    bad = sum(check(r) for r in roots)
    if bad:
        print(f"{bad} import cycle(s)")
        return 1
    print(f"no import cycles in {len(roots)} crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
