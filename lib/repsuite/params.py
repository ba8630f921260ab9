"""A paper's parameters: `params.yaml: papers.<slug>` checked against its notebook's parameters.

A paper's section holds its CPU-profile values, one key per parameter of the notebook, plus an
optional `profiles` mapping with the keys that change at the `smoke` and `gpu` profiles. The
notebook's own `profile` parameter is set by the runner, never in the section.
"""

import ast
from pathlib import Path

import yaml

PROFILES = ("smoke", "cpu", "gpu")
RESERVED = "profiles"


class ParamsError(ValueError):
    """A params section that does not fit its notebook; the message names the key and choices."""


def load_params_file(path: Path) -> dict:
    if not path.exists():
        raise ParamsError(f"{path.name} not found at the repository root")
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params.get("papers"), dict):
        raise ParamsError(f"{path.name} needs a `papers:` mapping of slug -> parameters")
    return params


def notebook_parameters(notebook: Path) -> dict:
    """name -> default value of every assignment in the notebook's `parameters` cell.

    Read with Python's own parser, one top-level assignment per parameter; a value that is not a
    plain literal (a call, an expression of other names) is refused with the line that holds it.
    """
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells
             if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ParamsError(f"{notebook.name} needs exactly one cell tagged `parameters`, "
                          f"found {len(cells)}")
    defaults = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            try:
                defaults[target.id] = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise ParamsError(
                    f"{notebook.name}: parameter {target.id!r} on line {node.lineno} is not a "
                    f"plain literal: {ast.unparse(value)}"
                ) from e
    return defaults


def _type_name(value) -> str:
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def _check_value(name: str, key: str, value, default, where: str) -> None:
    if default is None:
        return
    ok = isinstance(value, type(default))
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float) and isinstance(value, int):
        ok = True
    if not ok:
        raise ParamsError(
            f"{where}: {name}.{key} = {value!r} is {_type_name(value)}; the notebook's "
            f"{key} is {_type_name(default)} (default {default!r})"
        )


def resolve(slug: str, section: dict, declared: dict, profile: str,
            where: str = "params.yaml") -> dict:
    """The parameters to inject for `profile`, after checking every key and type in the section."""
    if profile not in PROFILES:
        raise ParamsError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if not isinstance(section, dict):
        raise ParamsError(f"{where}: papers.{slug} must be a mapping of parameter -> value")
    if "profile" not in declared:
        raise ParamsError(
            f"notebooks/{slug}.ipynb: the parameters cell needs a `profile` parameter"
        )
    valid = sorted(k for k in declared if k != "profile")

    overrides = section.get(RESERVED) or {}
    if not isinstance(overrides, dict):
        raise ParamsError(f"{where}: papers.{slug}.profiles must map smoke and gpu to overrides")
    unknown = sorted(set(overrides) - {"smoke", "gpu"})
    if unknown:
        raise ParamsError(f"{where}: papers.{slug}.profiles.{unknown[0]} is not a profile; "
                          "overrides exist for `smoke` and `gpu` (cpu is the section itself)")
    layers = [("papers." + slug, {k: v for k, v in section.items() if k != RESERVED})]
    layers += [(f"papers.{slug}.profiles.{p}", overrides.get(p) or {}) for p in ("smoke", "gpu")]
    for name, layer in layers:
        for key, value in layer.items():
            if key == "profile":
                raise ParamsError(
                    f"{where}: {name}.profile is set by the runner (--profile), not here"
                )
            if key not in declared:
                raise ParamsError(
                    f"{where}: unknown parameter {name}.{key}; notebooks/{slug}.ipynb takes: "
                    + ", ".join(valid)
                )
            _check_value(name, key, value, declared[key], where)

    resolved = dict(layers[0][1])
    if profile != "cpu":
        resolved.update(overrides.get(profile) or {})
    resolved["profile"] = profile
    return resolved
