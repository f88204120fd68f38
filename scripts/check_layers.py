#!/usr/bin/env python3
"""The workspace's layering rules, checked on the source text (run by `make test`):

1. No file imports a file that imports it back (two-file import loops), counting `use crate::…`,
   `use super::…`, paths written inline (`crate::a::b::f()`), and a `mod.rs` naming its own
   child modules (`child::f()`).
2. In qvlm-core, `io/` and `quant/` sit below `model/`: they import neither `model` nor
   `checkpoint` (whole-model files live above the model, in `checkpoint/`).
3. The crates depend one way: experiments → search → core (checked on Cargo.toml).

Comments and `#[cfg(test)]` modules (tests may reach anywhere) are not read. Exit status 1 with
one line per violation; 0 and a summary line otherwise.

Usage: python3 scripts/check_layers.py [REPO_ROOT]
"""
import os
import re
import sys

CRATES = ["core", "search", "experiments"]


def module_file(root, crate, path):
    """The file of module `path` (a list of names) in `crate`, or None."""
    base = os.path.join(root, "crates", crate, "src")
    if not path:
        return os.path.relpath(os.path.join(base, "lib.rs"), root)
    p = os.path.join(base, *path)
    for cand in (p + ".rs", os.path.join(p, "mod.rs")):
        if os.path.isfile(cand):
            return os.path.relpath(cand, root)
    return None


def expand(tree):
    """`a::{b, c::{d, e}}` → ["a::b", "a::c::d", "a::c::e"]."""
    m = re.match(r"^([\w:]*?)(::)?\{(.*)\}$", tree, re.S)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(3)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        for e in expand(part.strip()):
            if e:
                out.append(f"{prefix}::{e}" if prefix else e)
    return out


def imports_of(root, crate, file):
    """The files of `crate` that `file` imports."""
    base = os.path.join(root, "crates", crate, "src")
    text = open(os.path.join(root, file), encoding="utf-8").read().split("#[cfg(test)]")[0]
    text = "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))
    here = os.path.relpath(os.path.join(root, file), base)[:-3].split(os.sep)
    if here[-1] == "mod":
        here = here[:-1]
    if here in (["lib"], ["main"]):
        here = []
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text, re.S):
        tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+\w+", "", m.group(1)))
        paths += expand(tree)
    paths += re.findall(r"\b(?:crate|super)(?:::\w+)+", text)
    for child in re.findall(r"\bmod\s+(\w+)\s*;", text):
        if re.search(r"(?<![\w:])" + child + r"::", text):
            paths.append("self::" + child)
    deps = set()
    for p in paths:
        segs = p.split("::")
        head = {"crate": [], "super": here[:-1], "self": here}.get(segs[0])
        if head is None:
            continue
        path = [s for s in head + segs[1:] if s not in ("", "self", "*")]
        for k in range(len(path), -1, -1):
            target = module_file(root, crate, path[:k])
            if target:
                break
        if target and target != file:
            deps.add(target)
    return deps


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    graph = {}
    for crate in CRATES:
        base = os.path.join(root, "crates", crate, "src")
        for folder, _, files in os.walk(base):
            for name in files:
                if name.endswith(".rs"):
                    file = os.path.relpath(os.path.join(folder, name), root)
                    graph[file] = (crate, None)
    for file, (crate, _) in list(graph.items()):
        graph[file] = (crate, imports_of(root, crate, file))
    problems = []
    for a, (_, deps) in sorted(graph.items()):
        for b in sorted(deps):
            if a < b and a in graph[b][1]:
                problems.append(f"import loop: {a} <-> {b}")
        if a.startswith(("crates/core/src/io/", "crates/core/src/quant/")):
            for b in sorted(deps):
                if b.startswith(("crates/core/src/model/", "crates/core/src/checkpoint/")):
                    problems.append(f"upward import: {a} -> {b}")
    order = {"core": 0, "search": 1, "experiments": 2}
    for crate in CRATES:
        manifest = open(os.path.join(root, "crates", crate, "Cargo.toml"), encoding="utf-8").read()
        for dep, rank in (("qvlm-core", 0), ("qvlm-search", 1)):
            if re.search(rf"^{dep}(\.\w+)*\s*=", manifest, re.M) and rank >= order[crate]:
                problems.append(f"crate dependency against the layering: {crate} -> {dep}")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    edges = sum(len(d) for _, d in graph.values())
    print(f"check_layers: {len(graph)} files, {edges} imports, no loops, layers one way")


if __name__ == "__main__":
    main()
