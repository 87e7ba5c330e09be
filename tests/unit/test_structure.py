"""The codebase's own rules, checked on its files: no import cycle between modules, no
function over ~120 lines without a comment saying why, no block of six or more lines
repeated between files, a README of at most ~200 lines whose links resolve, and docs
pages that say in their first lines what they cover."""

import ast
import hashlib
import re
from collections import defaultdict
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("sweep", "ui")
CODE = [p for d in (*PACKAGES, "bench") for p in sorted((ROOT / d).rglob("*.py"))]
MAX_FUNCTION_LINES = 120
LONG_BECAUSE = "# long because:"  # the comment a longer function carries, saying why


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _top_level_imports(path: Path) -> set[str]:
    """Project modules imported when `path` is imported (not inside functions)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def test_no_import_cycle():
    modules = {_module(p): p for d in PACKAGES for p in (ROOT / d).rglob("*.py")}
    graph = {m: {i for i in _top_level_imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}"
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_function_over_the_limit_without_saying_why():
    long = []
    for path in CODE:
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if n > MAX_FUNCTION_LINES and LONG_BECAUSE not in body:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _meaningful(line: str) -> str | None:
    s = line.strip()
    if not s or s.startswith(("#", "import ", "from ")) or len(s) < 12 or re.fullmatch(r"[\W_]*(return|pass|else|try|finally)?[\W_]*", s):
        return None
    return s


def test_no_block_of_six_lines_repeated_between_files():
    seen: dict[str, set[str]] = defaultdict(set)
    where: dict[str, str] = {}
    for path in CODE:
        kept = [(i, m) for i, line in enumerate(path.read_text().splitlines(), 1) if (m := _meaningful(line))]
        for k in range(len(kept) - 5):
            block = "\n".join(m for _, m in kept[k:k + 6])
            h = hashlib.sha1(block.encode()).hexdigest()
            seen[h].add(str(path.relative_to(ROOT)))
            where.setdefault(h, f"{path.relative_to(ROOT)}:{kept[k][0]}")
    repeated = sorted(where[h] + " also in " + ", ".join(sorted(files)) for h, files in seen.items() if len(files) > 1)
    assert not repeated, repeated[:10]


def _links(text: str) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#|mailto:", m)]


def test_readme_is_short_and_every_link_of_the_docs_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "python -m sweep" in readme and "make test" in readme
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for link in _links(page.read_text()):
            target = (page.parent / link.split("#")[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, broken


def test_every_docs_page_says_what_it_covers_first():
    for page in sorted((ROOT / "docs").rglob("*.md")):
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# ") and len(lines) > 1 and not lines[1].startswith("#"), page


def test_each_check_is_named_after_the_expectation_it_emits():
    import inspect

    from sweep.validate import CHECKS

    for check in CHECKS:
        emitted = set(re.findall(r'Expectation\(\s*"([a-z_]+)"', inspect.getsource(check)))
        assert check.__name__.removeprefix("check_") in emitted, (check.__name__, emitted)
