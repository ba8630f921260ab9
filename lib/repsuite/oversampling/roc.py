"""ROC space as the paper uses it: points from sampling sweeps, their convex hull, and two areas.

A point is (FP rate, TP rate), both in [0, 1] (the paper plots them in percent). A sweep of
under-sampling amounts, loss ratios or priors gives one point per setting, not one per threshold.

- `convex_hull(points)`: the ROC convex hull (Provost & Fawcett), the upper hull of the points
  with the trivial classifiers (0, 0) and (1, 1); points on it are potentially optimal classifiers.
- `hull_area(points)`: the area under that hull (AUCH).
- `trapezoid_auc(points)`: the paper's AUC (Section 5.3): the points in order of FP rate, joined by
  straight lines from the lower-left point (the classifier on the raw data) to (1, 1), which is
  added when absent. (0, 0) is not added, so curves sharing the raw-data point are compared over
  the same range.
"""

import numpy as np


def check_points(points, what: str = "points") -> np.ndarray:
    """Points as an (n, 2) float array of rates in [0, 1], or a clear error."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim == 1 and pts.size == 2:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{what} must be (n, 2) pairs of (FP rate, TP rate), got shape "
                         f"{pts.shape}")
    if len(pts) == 0:
        raise ValueError(f"{what}: no ROC points given")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{what} contain NaN or infinite rates")
    if pts.min() < 0 or pts.max() > 1:
        raise ValueError(f"{what} must be rates in [0, 1] (not percent); got values in "
                         f"[{pts.min():g}, {pts.max():g}]")
    return pts


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def convex_hull(points) -> np.ndarray:
    """Vertices of the ROC convex hull, from (0, 0) to (1, 1) in order of FP rate.

    Monotone-chain upper hull; collinear points are dropped (they add no potentially optimal
    classifier that the hull's vertices do not already give).
    """
    pts = check_points(points)
    pts = np.vstack([[0.0, 0.0], pts, [1.0, 1.0]])
    # Sort by FP rate, and for equal FP rates by TP rate descending so only the best survives.
    order = np.lexsort((-pts[:, 1], pts[:, 0]))
    hull: list = []
    for p in pts[order]:
        if hull and p[0] == hull[-1][0]:
            continue
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return np.array(hull)


def on_hull(points, hull=None, tol: float = 1e-12) -> np.ndarray:
    """Boolean mask of the points that are vertices of `hull` (by default their own hull)."""
    pts = check_points(points)
    hull = convex_hull(pts) if hull is None else np.asarray(hull)
    return np.array([np.any(np.all(np.abs(hull - p) <= tol, axis=1)) for p in pts])


def hull_area(points) -> float:
    """Area under the ROC convex hull of the points (AUCH), in [0.5, 1]."""
    hull = convex_hull(points)
    return float(np.trapezoid(hull[:, 1], hull[:, 0]))


def trapezoid_auc(points) -> float:
    """The paper's AUC of a sweep: trapezoids from the leftmost point to (1, 1), added if absent."""
    pts = check_points(points)
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    if not np.allclose(pts[-1], [1.0, 1.0]):
        pts = np.vstack([pts, [1.0, 1.0]])
    return float(np.trapezoid(pts[:, 1], pts[:, 0]))


def plot_sweeps(ax, curves: dict, title: str = "") -> None:
    """Points and convex hull of each named sweep on one ROC axis, in percent as the paper plots."""
    for i, (name, pts) in enumerate(curves.items()):
        pts = check_points(pts, name)
        hull = convex_hull(pts)
        color = f"C{i}"
        ax.plot(100 * pts[:, 0], 100 * pts[:, 1], "o", ms=3.5, color=color, alpha=0.8)
        ax.plot(100 * hull[:, 0], 100 * hull[:, 1], "-", lw=1.2, color=color,
                label=f"{name} (AUCH {hull_area(pts):.3f})")
    ax.plot([0, 100], [0, 100], ":", color="grey", lw=0.8)
    ax.set(xlabel="%FP", ylabel="%TP", xlim=(0, 100), ylim=(0, 101), title=title)
    ax.legend(fontsize=7, loc="lower right")
