"""The documentation: every Python sample compiles and names only things that exist.

Each fenced ``python`` block of README.md and docs/*.md is one test (id ``docs/guide.md:49``,
the line of its opening fence). A block is parsed and compiled, then:

- every ``import`` / ``from ... import`` of ``django_workitems`` is imported for real and each
  imported name must be an attribute (or a submodule) of its module;
- every import from the example project (``catalog``, ``example_project``, or a relative import
  in a sample headed ``# catalog/handlers.py``) is checked statically against the example
  project's sources (its models need its settings, which are not the suite's), or else must be
  defined by another sample of the docs (the guide's tutorial classes);
- every ``workitems.X.Y`` attribute chain resolves on the package;
- every ``add_handler(...)`` call uses only keywords of ``HandlerRegistry.add_handler``;
- every string naming a dotted path in the package (``"django_workitems.log.ContextFilter"``)
  resolves.

A block that is a deliberate fragment and cannot be parsed is marked ``<!-- fragment -->`` on
the line before its fence: it is not compiled, and its import lines and ``workitems.X``
references are checked by regular expressions instead.

The site itself is built with ``mkdocs build --strict`` by a test here (and by ``make docs``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from django_workitems.registry import HandlerRegistry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example_project"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = "django_workitems"
EXAMPLE_PACKAGES = {"catalog", "example_project"}
FRAGMENT_MARK = "<!-- fragment -->"
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)\s*$")
HEADER = re.compile(r"^#\s*(?P<package>\w+)/")  # "# catalog/handlers.py" names its package
DOTTED = re.compile(rf"^{PACKAGE}(\.[A-Za-z_]\w*)+$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    code: str
    fragment: bool

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        start, fence = i, opening["fence"]
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        if opening["lang"] == "python":
            previous = lines[start - 1].strip() if start else ""
            found.append(
                Block(
                    path=str(path.relative_to(ROOT)),
                    line=start + 1,
                    code=textwrap.dedent("\n".join(lines[start + 1 : i])) + "\n",
                    fragment=previous == FRAGMENT_MARK,
                )
            )
        i += 1
    return found


BLOCKS = [block for path in DOC_FILES for block in _blocks(path)]


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _docs_defined() -> dict[str, str]:
    """Names defined at the top of some parseable sample, with the sample that defines them."""
    defined: dict[str, str] = {}
    for block in BLOCKS:
        try:
            tree = ast.parse(block.code)
        except SyntaxError:  # a fragment, or a broken sample that its own test reports
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                defined.setdefault(node.name, block.id)
    return defined


DOCS_DEFINED = _docs_defined()


def _example_module_names(module: str) -> set[str] | None:
    """Top-level names of an example project module, from its source; None if there is none."""
    base = EXAMPLE.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            names = _top_level_names(ast.parse(candidate.read_text()))
            if candidate.name == "__init__.py":  # submodules are importable names too
                names.update(p.stem for p in base.glob("*.py") if p.stem != "__init__")
                names.update(p.name for p in base.iterdir() if (p / "__init__.py").is_file())
            return names
    return None


def _check_package_import(module: str, names: list[str]) -> list[str]:
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        return [f"import {module}: {exc}"]
    problems = []
    for name in names:
        if name == "*" or hasattr(imported, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            problems.append(f"{module} has no {name!r}")
    return problems


def _check_example_import(module: str, names: list[str]) -> list[str]:
    defined = _example_module_names(module)
    problems = []
    for name in names:
        if defined is not None and name in defined:
            continue
        if name in DOCS_DEFINED:  # a class of the docs' own tutorial
            continue
        where = "does not exist" if defined is None else f"has no {name!r}"
        problems.append(f"example project module {module} {where} (nor do the docs define it)")
    if defined is None and not names:
        problems.append(f"example project module {module} does not exist")
    return problems


def _check_import(module: str, names: list[str], level: int, package: str | None) -> list[str]:
    if level:
        if package is None or level > 1:
            return []  # a relative import with no known package: nothing to check it against
        module = f"{package}.{module}" if module else package
    top = module.split(".")[0]
    if top == PACKAGE:
        return _check_package_import(module, names)
    if top in EXAMPLE_PACKAGES or level:
        return _check_example_import(module, names)
    return []


def _header_package(block: Block) -> str | None:
    first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
    header = HEADER.match(first)
    return header["package"] if header else None


def _resolve(path: list[str]) -> str | None:
    """Import the longest module prefix of path, getattr the rest; a problem, or None."""
    for cut in range(len(path), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(path[:cut]))
        except ImportError:
            continue
        for i, attr in enumerate(path[cut:], start=cut):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                return f"{'.'.join(path[:i])} has no {attr!r}"
        return None
    return f"cannot import {path[0]}"


def _attribute_chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    attrs: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        attrs.append(current.attr)
        current = current.value
    if isinstance(current, ast.Name):
        return current.id, attrs[::-1]
    return None


def _package_aliases(tree: ast.Module) -> set[str]:
    aliases = {"workitems"}  # the docs' convention: import django_workitems as workitems
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name == PACKAGE and a.asname)
    return aliases


ADD_HANDLER_KEYWORDS = set(inspect.signature(HandlerRegistry.add_handler).parameters) - {"self"}


def _problems_of_tree(tree: ast.Module, package: str | None) -> list[str]:
    problems: list[str] = []
    aliases = _package_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                problems += _check_import(alias.name, [], 0, package)
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            problems += _check_import(node.module or "", names, node.level, package)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = _attribute_chain(node)
            if chain is not None and chain[0] in aliases:
                # Only the longest chain matters; its prefixes resolve along the way.
                problem = _resolve([PACKAGE, *chain[1]])
                if problem is not None:
                    problems.append(f"{chain[0]}.{'.'.join(chain[1])}: {problem}")
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == "add_handler":
                unknown = {k.arg for k in node.keywords if k.arg} - ADD_HANDLER_KEYWORDS
                if unknown:
                    problems.append(f"add_handler() takes no keyword {sorted(unknown)}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and DOTTED.match(node.value)
        ):
            problem = _resolve(node.value.split("."))
            if problem is not None:
                problems.append(f"{node.value!r}: {problem}")
    return sorted(set(problems))


FROM_LINE = re.compile(r"^\s*from\s+(?P<dots>\.*)(?P<module>[\w.]*)\s+import\s+(?P<names>[^#]+)")
IMPORT_LINE = re.compile(r"^\s*import\s+(?P<modules>[\w., ]+?)(\s+as\s+\w+)?\s*(#.*)?$")
ADD_HANDLER_KEYWORD = re.compile(r"^\s*(?P<name>\w+)\s*=")


def _problems_of_fragment(block: Block, package: str | None) -> list[str]:
    problems: list[str] = []
    for line in block.code.splitlines():
        if match := FROM_LINE.match(line):
            names = [n.split(" as ")[0].strip() for n in match["names"].strip("() \n").split(",")]
            problems += _check_import(
                match["module"], [n for n in names if n], len(match["dots"]), package
            )
        elif match := IMPORT_LINE.match(line):
            for module in match["modules"].split(","):
                problems += _check_import(module.strip(), [], 0, package)
    for attr in set(re.findall(r"\bworkitems\.([A-Za-z_]\w*)", block.code)):
        problem = _resolve([PACKAGE, attr])
        if problem is not None:
            problems.append(f"workitems.{attr}: {problem}")
    for dotted in set(re.findall(rf"[\"'](?P<path>{PACKAGE}(?:\.[A-Za-z_]\w*)+)[\"']", block.code)):
        problem = _resolve(dotted.split("."))
        if problem is not None:
            problems.append(f"{dotted!r}: {problem}")
    return sorted(set(problems))


def test_the_docs_have_python_samples() -> None:
    assert len(BLOCKS) >= 20, [b.id for b in BLOCKS]
    assert any(b.path == "README.md" for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_sample(block: Block) -> None:
    package = _header_package(block)
    if block.fragment:
        problems = _problems_of_fragment(block, package)
    else:
        tree = ast.parse(block.code, filename=block.id)
        compile(tree, block.id, "exec")
        problems = _problems_of_tree(tree, package)
    assert not problems, f"{block.id}:\n" + "\n".join(problems)


EXCERPT_HEADER = re.compile(r"^#\s*(?P<file>[\w/]+\.py)\b")
EXCERPTS = [
    b for b in BLOCKS if b.path == "docs/example.md" and EXCERPT_HEADER.match(b.code.lstrip())
]


def _members(node: ast.ClassDef) -> set[str]:
    return _top_level_names(ast.Module(body=node.body, type_ignores=[]))


@pytest.mark.parametrize("block", EXCERPTS, ids=[b.id for b in EXCERPTS])
def test_an_excerpt_of_the_example_project_matches_its_file(block: Block) -> None:
    """A sample headed ``# catalog/handlers/store.py`` shows classes and methods of that file."""
    header = EXCERPT_HEADER.match(block.code.lstrip())
    assert header is not None
    source = EXAMPLE / header["file"]
    assert source.is_file(), f"{block.id}: no file example_project/{header['file']}"
    real = {
        node.name: node
        for node in ast.parse(source.read_text()).body
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    }
    shown = ast.parse(block.code).body
    for node in shown:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.name in real, f"{block.id}: {source.name} has no {node.name}"
            actual = real[node.name]
            if isinstance(node, ast.ClassDef) and isinstance(actual, ast.ClassDef):
                missing = _members(node) - _members(actual)
                assert not missing, f"{block.id}: {node.name} has no {sorted(missing)}"


def test_fragment_checks_still_catch_a_missing_name() -> None:
    code = 'from django_workitems import NoSuchThing\n"()": "django_workitems.log.Nope",\n'
    block = Block("x.md", 1, code + "[..., workitems.Nope]", True)
    assert _problems_of_fragment(block, None) == [
        "'django_workitems.log.Nope': django_workitems.log has no 'Nope'",
        "django_workitems has no 'NoSuchThing'",
        "workitems.Nope: django_workitems has no 'Nope'",
    ]


def test_sample_checks_catch_missing_names_and_keywords() -> None:
    code = textwrap.dedent(
        """
        import django_workitems as wi
        from catalog.handlers import StoreBatchHandler, NoSuchHandler
        from django_workitems.testing import run_handler
        wi.add_handler(StoreBatchHandler, name="x", max_items=3)
        wi.Purpose.NOPE
        LOGGING = {"()": "django_workitems.log.NoFilter"}
        """
    )
    assert _problems_of_tree(ast.parse(code), None) == [
        "'django_workitems.log.NoFilter': django_workitems.log has no 'NoFilter'",
        "add_handler() takes no keyword ['max_items']",
        "example project module catalog.handlers has no 'NoSuchHandler' (nor do the docs "
        "define it)",
        "wi.Purpose.NOPE: django_workitems.Purpose has no 'NOPE'",
    ]


def test_the_docs_home_page_is_the_readme() -> None:
    """docs/index.md is README.md with its links made relative to docs/."""
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "index.md").read_text() == readme.replace("](docs/", "](")
    assert len(readme.encode()) < 15_000


def test_every_docs_page_is_in_the_nav_and_linked_from_the_readme() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, page.name
        if page.name != "index.md":
            assert f"](docs/{page.name})" in readme, page.name


def test_every_environment_variable_of_the_example_is_documented() -> None:
    settings = (EXAMPLE / "example_project" / "settings.py").read_text()
    variables = set(re.findall(r"\benv(?:\.\w+)?\(\s*\"(\w+)\"", settings))
    assert {"DATABASE_URL", "WORKITEMS_WORKERS", "CATALOG_WEBHOOK_URL"} <= variables
    example = (ROOT / "docs" / "example.md").read_text()
    missing = sorted(v for v in variables if f"| `{v}` |" not in example)
    assert not missing, f"docs/example.md does not list {missing}"


def test_the_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "guide" / "index.html").is_file()
