"""The house: no import circles between the project's modules, and every command the README and docs show exists."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in it (inside functions and TYPE_CHECKING blocks too)."""
    modules = {f"{package}.{path.stem}": path for package in ("model", "sweep")
               for path in (REPO / package).glob("*.py") if path.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        package = name.split(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = f"{package}.{node.module}" if node.level == 1 else (node.module or "")
                imported |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 20 and graph["sweep.cli"]  # the walk sees the project
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # and would see a circle


def test_model_never_imports_ray_or_sweep():
    for path in (REPO / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not [n for n in names if n.split(".")[0] in ("ray", "sweep")], (path.name, names)


def documented_commands() -> set[str]:
    """`sweep <command>` in the shell blocks of README.md and docs/*.md."""
    commands = set()
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|console|sh)?\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                line = line.strip().removeprefix("$ ")
                for match in re.finditer(r"(?:^|&& |\| |; )(?:[A-Z_]+=\S+ )*sweep ([a-z][a-z-]*)", line):
                    commands.add(match.group(1))
    return commands


def test_every_command_the_readme_and_docs_show_exists():
    commands = documented_commands()
    assert {"launch", "best", "circuit"} <= commands, commands
    for command in sorted(commands):
        result = subprocess.run([sys.executable, "-m", "sweep.cli", command, "-h"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, (command, result.stderr)


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO / "docs").glob("*.md")))
def test_every_docs_page_the_readme_links_exists_and_is_linked(page):
    assert f"docs/{page}" in (REPO / "README.md").read_text()


def test_the_replicates_page_s_python_runs_as_written():
    page = (REPO / "docs" / "replicates.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert blocks
    printed = ""
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 0, result.stderr
        printed += result.stdout
    # what the page says the snippets print
    assert "'estimate': 2000000.0, 'interval': [1000000.0, None]" in printed
    assert "{'0.2': 'previous_token', '1.1': 'induction'}" in printed


def third_party_imports() -> dict[str, bool]:
    """Top-level names of the non-project, non-stdlib modules model/ and sweep/ import -> whether any import of it
    runs at module level (a function's own import may be an optional extra, checked when it is used)."""
    found: dict[str, bool] = {}
    for path in [*(REPO / "model").glob("*.py"), *(REPO / "sweep").glob("*.py")]:
        tree = ast.parse(path.read_text())
        at_module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in {n.split(".")[0] for n in names} - {"model", "sweep", "__future__"}:
                if name not in sys.stdlib_module_names:
                    found[name] = found.get(name, False) or id(node) in at_module_level
    return found


def declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_package_the_code_imports_is_a_declared_dependency():
    """A user's `pip install circuit-sweep` (no test extras) has everything the commands import."""
    from importlib.metadata import packages_distributions

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = declared(project["dependencies"])
    extras = {name: declared(reqs) for name, reqs in project["optional-dependencies"].items() if name != "test"}
    optional = set().union(*extras.values())
    distributions = packages_distributions()
    imports = third_party_imports()
    assert {"torch", "ray", "click", "jinja2", "psutil"} <= set(imports), imports  # the walk sees the code
    for module, module_level in sorted(imports.items()):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        allowed = required if module_level else required | optional
        assert names & allowed, f"{module} (from {sorted(names)}) is imported but not in pyproject's dependencies"


def test_a_built_wheel_carries_every_report_template(tmp_path):
    """The report's templates, stylesheet and script ship in the wheel, not just in a source checkout."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # built from a copy: setuptools writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for package in ("model", "sweep"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr

    (wheel,) = tmp_path.glob("circuit_sweep-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("sweep/templates/")}
    templates = {f"sweep/templates/{path.name}" for path in (REPO / "sweep" / "templates").iterdir()}
    assert {"sweep/templates/report.html", "sweep/templates/report.css"} <= templates
    assert templates <= shipped, sorted(templates - shipped)
