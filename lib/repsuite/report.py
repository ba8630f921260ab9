"""Self-contained HTML reports of executed notebooks.

nbconvert's stock template loads require.js and MathJax from a CDN. The `offline` template here
drops every remote script, and MathJax 3 (SVG output, so no web fonts either) is inlined from the
copy that the `django-static-mathjax` package ships. Figures are embedded by nbconvert as base64
images.
"""

import re
import sysconfig
import warnings
from functools import cache
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

TEMPLATES = Path(__file__).parent / "templates"
REMOTE = re.compile(r"<(script|link|img|iframe)[^>]+(src|href)=['\"](https?:)?//", re.I)


@cache
def mathjax_source() -> str | None:
    """The MathJax 3 tex-svg bundle from site-packages, or None when the package is missing."""
    path = Path(sysconfig.get_paths()["purelib"]) / "mathjax/static/mathjax/es5/tex-svg.js"
    if not path.exists():
        warnings.warn(f"MathJax not found at {path}: reports will show math as raw TeX",
                      stacklevel=2)
        return None
    return path.read_text(encoding="utf-8")


def render_html(executed: Path, out: Path, title: str | None = None) -> Path:
    """Render an executed notebook to one HTML file that loads nothing from any network."""
    nb = nbformat.read(executed, as_version=4)
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATES)],
                            embed_images=True)
    resources = {"mathjax_source": mathjax_source(), "metadata": {"name": title or executed.stem}}
    html, _ = exporter.from_notebook_node(nb, resources=resources)
    remote = REMOTE.search(html)
    if remote:
        raise RuntimeError(f"report {out.name} would load a remote asset: {remote.group(0)[:120]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
