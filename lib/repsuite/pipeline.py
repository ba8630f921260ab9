"""What each paper's stage depends on, found from the code rather than listed by hand.

`python -m repsuite.pipeline` writes `build/deps/<slug>.json` for every paper in params.yaml: the
library modules its notebook imports (followed transitively through the package, `__init__` files
and the runner's own modules included) and the exported data files it names, each with a content
hash. A paper's DVC stage depends on that one file, so it reruns when, and only when, code or data
it actually uses changes; editing one method family leaves the other papers' stages untouched.
"""

import ast
import hashlib
import json
import sys
from pathlib import Path

import nbformat
import yaml

from repsuite import data, paths
from repsuite.params import ParamsError
from repsuite.run import prepare

PACKAGE = "repsuite"
# The stage command runs the runner for every paper: its modules and its report template.
RUNNER = "import repsuite.run"
TEMPLATES = ("templates/offline/index.html.j2", "templates/offline/conf.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def notebook_source(notebook: Path) -> str:
    """The notebook's code cells as one Python source, without IPython magics and shell lines."""
    nb = nbformat.read(notebook, as_version=4)
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines += [ln for ln in cell.source.splitlines()
                      if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def imported_modules(source: str, current: str = PACKAGE) -> set[str]:
    """Dotted names of `repsuite` modules (and of names from-imported from them) in `source`.

    `current` is the dotted name of the module holding `source` (`a.b.__init__` for a package),
    so that relative imports resolve.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = current.split(".")[: -node.level]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] == PACKAGE:
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}
    return found


def module_files(names: set[str], lib: Path) -> set[Path]:
    """Files of the named modules, their packages' `__init__.py`, and all they import in turn.

    A from-imported name that is not a module (a function, say) simply matches no file.
    """
    files, todo = set(), list(names)
    while todo:
        parts = todo.pop().split(".")
        candidates = [(lib.joinpath(*parts[:i], "__init__.py"), ".".join(parts[:i]) + ".__init__")
                      for i in range(1, len(parts) + 1)]
        candidates.append((lib.joinpath(*parts).with_suffix(".py"), ".".join(parts)))
        for path, dotted in candidates:
            if path.exists() and path not in files:
                files.add(path)
                todo += imported_modules(path.read_text(), dotted)
    return files


def paper_dependencies(slug: str, section: dict, root: Path) -> dict:
    lib = root / "lib"
    notebook = root / "notebooks" / f"{slug}.ipynb"
    source = notebook_source(notebook)
    files = module_files(imported_modules(source), lib)
    files |= module_files(imported_modules(RUNNER), lib)
    files |= {lib / PACKAGE / name for name in TEMPLATES}

    # A dataset counts as used when its name appears as a string in the notebook or its parameters.
    strings = {n.value for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    strings |= set(_strings(section))
    datasets = sorted(name for name in data.SOURCES if name in strings)
    return {
        "modules": {str(p.relative_to(root)): _sha256(p) for p in sorted(files)},
        "data": {f"data/{name}.npz": _sha256(data.file_path(name)) if data.file_path(name).exists()
                 else None for name in datasets},
    }


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def main() -> int:
    root = paths.repo_root()
    papers = yaml.safe_load((root / "params.yaml").read_text())["papers"]
    out = root / "build" / "deps"
    out.mkdir(parents=True, exist_ok=True)
    # Every paper's parameters are checked here, before any paper stage starts: DVC clears a
    # stage's outputs when it starts it, so a bad value must stop the pipeline first.
    try:
        for slug in papers:
            prepare(slug, None, root)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for slug, section in papers.items():
        deps = paper_dependencies(slug, section, root)
        (out / f"{slug}.json").write_text(json.dumps(deps, indent=1, sort_keys=True) + "\n")
        print(f"{slug}: {len(deps['modules'])} modules, data: {', '.join(deps['data']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
