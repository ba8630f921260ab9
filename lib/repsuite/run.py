"""Run one paper: check its parameters, execute its notebook with papermill, render its report.

    python -m repsuite.run <slug> [--profile smoke|cpu|gpu] [--output DIR]

The profile defaults to `params.yaml: profile` (itself `cpu` when absent). Outputs go under
`<output>/reports/`: `executed/<slug>.ipynb`, `<slug>.html`, `figures/<slug>/` and
`metrics/<slug>.json` (written by the notebook). The output defaults to the repository, except for a
run at another profile than the pipeline's, which goes to `build/runs/<profile>/` so that a trial
never overwrites the committed results. A bad params section fails before any work; a failing cell
prints its error first and the run exits non-zero, leaving the previous results in place and the
failed run's report in `reports/failed/`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from repsuite import paths
from repsuite.params import PROFILES, ParamsError, load_params_file, notebook_parameters, resolve
from repsuite.progress import HEADLESS_ENV


def pipeline_profile(root: Path) -> str:
    """The profile `dvc repro` runs: `params.yaml: profile`, or cpu."""
    return load_params_file(root / "params.yaml").get("profile", "cpu")


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
    profile = profile or pipeline_profile(root)
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


def _publish(staged: Path, final: Path) -> None:
    """Replace `final` (a file or a folder) by `staged`."""
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)


def run(slug: str, profile: str | None = None, output: Path | None = None,
        root: Path | None = None) -> int:
    """Run one paper; 0 on success, 1 when the notebook fails, 2 when its parameters are wrong.

    Everything is written to a staging folder first and moved into `<output>/reports/` only when
    the run succeeds, so a failed run leaves the previous results as they were; its own executed
    notebook and report go to `reports/failed/`.
    """
    from papermill.exceptions import PapermillExecutionError

    from repsuite.report import render_html

    root = root or paths.repo_root()
    try:
        notebook, parameters = prepare(slug, profile, root)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if output is None and profile is not None and profile != pipeline_profile(root):
        # A trial at another profile must not overwrite the pipeline's committed results.
        output = root / "build" / "runs" / profile
    reports = (output or root).resolve() / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{slug}-", dir=reports))
    staged = staging / "reports"

    # The kernel inherits these: the ledger writes its metrics under the staging folder.
    os.environ[paths.OUTPUT_ENV] = str(staging)
    os.environ[HEADLESS_ENV] = "1"
    start = time.perf_counter()
    try:
        try:
            executed = execute(slug, notebook, parameters, staging, root)
        except PapermillExecutionError:
            failed = reports / "failed"
            failed.mkdir(exist_ok=True)
            executed = staged / "executed" / f"{slug}.ipynb"
            print(f"error: {slug} failed at {first_error(executed)}", file=sys.stderr)
            _publish(executed, failed / f"{slug}.ipynb")
            render_html(failed / f"{slug}.ipynb", failed / f"{slug}.html", title=slug)
            print(f"the failed run's report: {failed / f'{slug}.html'}; the previous results in "
                  f"{reports} are untouched", file=sys.stderr)
            return 1

        metrics = staged / "metrics" / f"{slug}.json"
        if not metrics.exists():
            print(f"error: {slug} ran but wrote no {metrics.name} (ledger.write() missing?)",
                  file=sys.stderr)
            return 1
        render_html(executed, staged / f"{slug}.html", title=slug)
        extract_figures(executed, staged / "figures" / slug)
        # The ledger times the notebook from its setup cell; the wall time adds kernel start and
        # the render.
        wall = round(time.perf_counter() - start, 1)
        written = json.loads(metrics.read_text())
        written["wall_s"] = wall
        metrics.write_text(json.dumps(written, indent=1) + "\n")

        for part in (f"executed/{slug}.ipynb", f"{slug}.html", f"figures/{slug}",
                     f"metrics/{slug}.json"):
            _publish(staged / part, reports / part)
        for stale in (reports / "failed").glob(f"{slug}.*"):
            stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{slug}: profile {parameters['profile']}, {wall:.1f} s -> {reports / f'{slug}.html'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repsuite.run", description=__doc__.splitlines()[0])
    ap.add_argument("slug", help="the paper to run (a key of params.yaml: papers)")
    ap.add_argument("--profile", choices=PROFILES,
                    help="default: params.yaml's `profile`, else cpu")
    ap.add_argument("--output", type=Path,
                    help="folder to write reports/ into (default: the repository, or "
                         "build/runs/<profile> for a profile other than the pipeline's)")
    args = ap.parse_args(argv)
    return run(args.slug, args.profile, args.output)


if __name__ == "__main__":
    sys.exit(main())
