"""Run one paper: check its parameters, execute its notebook with papermill, render its report.

    python -m repsuite.run <slug> [--profile smoke|cpu|gpu] [--output DIR]

The profile defaults to `params.yaml: profile` (itself `cpu` when absent). Outputs go under
`<output>/reports/`: `executed/<slug>.ipynb`, `<slug>.html` and `metrics/<slug>.json` (written by
the notebook). A bad params section fails before any work; a failing cell prints its error first and
the run exits non-zero, with the report of the failed run still rendered for reading.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from repsuite import paths
from repsuite.params import PROFILES, ParamsError, load_params_file, notebook_parameters, resolve
from repsuite.progress import HEADLESS_ENV


def prepare(slug: str, profile: str | None, root: Path) -> tuple[Path, dict]:
    """The notebook path and its resolved parameters, or ParamsError before anything runs."""
    params = load_params_file(root / "params.yaml")
    papers = params["papers"]
    if slug not in papers:
        raise ParamsError(
            f"unknown paper {slug!r}; params.yaml has: {', '.join(sorted(papers)) or '(none)'}"
        )
    notebook = root / "notebooks" / f"{slug}.ipynb"
    if not notebook.exists():
        raise ParamsError(f"notebooks/{slug}.ipynb not found (params.yaml has a section for it)")
    profile = profile or params.get("profile", "cpu")
    return notebook, resolve(slug, papers[slug], notebook_parameters(notebook), profile)


def first_error(executed: Path) -> str:
    """One line naming the failing cell and its error, from the executed notebook."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                value = " ".join(str(output.get("evalue", "")).split())
                first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                return (f"cell In[{cell.get('execution_count')}] ({first[:60]!r}): "
                        f"{output.get('ename')}: {value}")
    return "the notebook failed without an error output"


def execute(slug: str, notebook: Path, parameters: dict, out_root: Path, root: Path) -> Path:
    import papermill

    executed = out_root / "reports" / "executed" / f"{slug}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(executed), parameters=parameters, kernel_name="python3",
        language="python", cwd=str(root), progress_bar=False, log_output=False,
        # Quiet the kernel's start-up warnings so a failure's error is the first thing printed.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    return executed


def extract_figures(executed: Path, folder: Path) -> int:
    """Save every PNG figure of the executed notebook as `<folder>/fig-NN.png`; return the count."""
    import base64

    import nbformat

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("fig-*.png"):
        old.unlink()
    count = 0
    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                count += 1
                (folder / f"fig-{count:02d}.png").write_bytes(base64.b64decode(png))
    return count


def run(slug: str, profile: str | None = None, output: Path | None = None,
        root: Path | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError

    from repsuite.report import render_html

    root = root or paths.repo_root()
    out_root = (output or root).resolve()
    try:
        notebook, parameters = prepare(slug, profile, root)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # The kernel inherits this, so the notebook's ledger writes its metrics under out_root.
    os.environ[paths.OUTPUT_ENV] = str(out_root)
    os.environ[HEADLESS_ENV] = "1"
    metrics = out_root / "reports" / "metrics" / f"{slug}.json"
    metrics.unlink(missing_ok=True)
    html = out_root / "reports" / f"{slug}.html"
    start = time.perf_counter()
    try:
        executed = execute(slug, notebook, parameters, out_root, root)
    except PapermillExecutionError:
        executed = out_root / "reports" / "executed" / f"{slug}.ipynb"
        print(f"error: {slug} failed at {first_error(executed)}", file=sys.stderr)
        render_html(executed, html, title=slug)
        print(f"the failed run's report: {html}", file=sys.stderr)
        return 1
    render_html(executed, html, title=slug)
    extract_figures(executed, out_root / "reports" / "figures" / slug)
    if not metrics.exists():
        print(f"error: {slug} ran but wrote no {metrics.name} (ledger.write() missing?)",
              file=sys.stderr)
        return 1
    # The ledger times the notebook from its setup cell; the wall time adds kernel start and render.
    wall = round(time.perf_counter() - start, 1)
    written = json.loads(metrics.read_text())
    written["wall_s"] = wall
    metrics.write_text(json.dumps(written, indent=1) + "\n")
    print(f"{slug}: profile {parameters['profile']}, {wall:.1f} s -> {html}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repsuite.run", description=__doc__.splitlines()[0])
    ap.add_argument("slug", help="the paper to run (a key of params.yaml: papers)")
    ap.add_argument("--profile", choices=PROFILES,
                    help="default: params.yaml's `profile`, else cpu")
    ap.add_argument("--output", type=Path, help="folder to write reports/ into (default: the repo)")
    args = ap.parse_args(argv)
    return run(args.slug, args.profile, args.output)


if __name__ == "__main__":
    sys.exit(main())
