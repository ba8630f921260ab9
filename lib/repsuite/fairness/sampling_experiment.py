"""The simulation study of adaptive sampling: genotypes, strategies, oracle and checks.

Genotypes follow the Balding-Nichols model with independent SNPs, which gives every model's R^2
in every group exactly (an infinite test set). Per seed: draw a population and one stream of
samples per group (every strategy buys from the front of the same streams, so comparisons are
paired); run the adaptive sampler for each (objective, costs) scenario, the fixed heuristics,
and an oracle that picks the best fixed allocation from replicate streams of the same
population (never from the evaluation streams, whose own best allocation would be biased
upwards). Every number is the exact population R^2 of the ridge model a strategy ends with.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from repsuite.fairness import sampling as S
from repsuite.progress import bar
from repsuite.stats import mean_ci

# -------------------------------------------------------------------------------------------------
# Genotypes and phenotypes: the Balding-Nichols model


def balding_nichols(p_ancestral, n_groups: int, fst: float, rng: np.random.Generator):
    """Allele frequencies of `n_groups` groups drifted from the ancestral ones with `F_ST = fst`.

    Each group's frequency at a SNP is Beta(p (1 - F) / F, (1 - p) (1 - F) / F): mean `p`,
    variance `F p (1 - p)`.
    """
    p = S.as_vector(p_ancestral, "p_ancestral")
    if not 0 < fst < 1:
        raise ValueError(f"fst must be in (0, 1), got {fst}")
    if np.any((p <= 0) | (p >= 1)):
        raise ValueError("ancestral allele frequencies must lie strictly between 0 and 1")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    k = (1 - fst) / fst
    return rng.beta(p * k, (1 - p) * k, size=(n_groups, p.size))


def fst_estimate(freqs, p_ancestral) -> float:
    """F_ST as the mean squared drift from the ancestral frequencies over the ancestral p(1-p)."""
    freqs = np.atleast_2d(np.asarray(freqs, dtype=float))
    p = S.as_vector(p_ancestral, "p_ancestral")
    if freqs.shape[1] != p.size:
        raise ValueError(f"freqs has {freqs.shape[1]} SNPs and p_ancestral {p.size}")
    return float(((freqs - p) ** 2).mean() / (p * (1 - p)).mean())


@dataclass(frozen=True)
class Population:
    """Groups that share an ancestral population; genotypes are standardised by the ancestral p.

    Phenotype of a member of group g: `y = x . beta_g + e`, `e ~ N(0, 1 - h2_g)`, with `beta_g`
    scaled so that the genetic variance in group g is `h2_g` (SNPs are independent).
    """

    p_ancestral: np.ndarray  # (M,)
    freqs: np.ndarray  # (G, M) group allele frequencies
    beta: np.ndarray  # (G, M) effects on standardised genotypes (zero off the causal SNPs)
    heritability: np.ndarray  # (G,)

    @property
    def n_groups(self) -> int:
        return self.freqs.shape[0]

    @property
    def n_snps(self) -> int:
        return self.freqs.shape[1]

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-group mean and variance of the standardised genotypes, (G, M) each."""
        p, q = self.p_ancestral, self.freqs
        scale = np.sqrt(2 * p * (1 - p))
        return 2 * (q - p) / scale, 2 * q * (1 - q) / scale**2

    def sample(self, g: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` members of group `g`: standardised genotypes (n, M) and phenotypes (n,)."""
        if not 0 <= g < self.n_groups:
            raise ValueError(f"group {g} does not exist: the population has {self.n_groups}")
        p = self.p_ancestral
        counts = rng.binomial(2, self.freqs[g], size=(n, self.n_snps))
        X = (counts - 2 * p) / np.sqrt(2 * p * (1 - p))
        noise = rng.normal(0.0, np.sqrt(1 - self.heritability[g]), size=n)
        return X, X @ self.beta[g] + noise

    def r2(self, w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Exact R^2 in every group of `y_hat = mu_g + x . w`: an infinite test set per group.

        `w` is (..., M) and `mu` (..., G); the result is (..., G). Each group's R^2 is taken
        around its own mean, as `sklearn.metrics.r2_score` on that group's test rows.
        """
        mean, var = (torch.as_tensor(a, dtype=w.dtype, device=w.device) for a in self.moments())
        beta = torch.as_tensor(self.beta, dtype=w.dtype, device=w.device)
        noise = torch.as_tensor(1 - self.heritability, dtype=w.dtype, device=w.device)
        bias = mu + (mean * (w.unsqueeze(-2) - beta)).sum(-1)
        spread = (var * (w.unsqueeze(-2) - beta) ** 2).sum(-1)
        total = (var * beta**2).sum(-1) + noise
        return 1 - (bias**2 + spread + noise) / total


def simulate_population(*, n_snps: int, n_causal: int, fst: float, heritability, rho: float,
                        seed: int, maf_range=(0.05, 0.95)) -> Population:
    """A Balding-Nichols population whose groups share causal SNPs with correlated effects.

    The causal effects of the groups are equicorrelated normals (correlation `rho`); each
    group's effects are then scaled to its own heritability.
    """
    h2 = S.as_vector(heritability, "heritability")
    if np.any((h2 <= 0) | (h2 >= 1)):
        raise ValueError(f"heritability must lie in (0, 1) for every group, got {h2.tolist()}")
    if not 1 <= n_causal <= n_snps:
        raise ValueError(f"n_causal must be between 1 and n_snps ({n_snps}), got {n_causal}")
    if not -1 / max(h2.size - 1, 1) < rho <= 1:
        raise ValueError(f"rho = {rho} gives no valid correlation matrix for {h2.size} groups")
    rng = np.random.default_rng(seed)
    p = rng.uniform(*maf_range, size=n_snps)
    freqs = balding_nichols(p, h2.size, fst, rng)

    corr = np.full((h2.size, h2.size), rho) + (1 - rho) * np.eye(h2.size)
    causal = rng.choice(n_snps, size=n_causal, replace=False)
    beta = np.zeros((h2.size, n_snps))
    beta[:, causal] = rng.multivariate_normal(np.zeros(h2.size), corr, size=n_causal).T
    pop = Population(p, freqs, beta, h2)
    genetic = (pop.moments()[1] * beta**2).sum(1)
    return Population(p, freqs, beta * np.sqrt(h2 / genetic)[:, None], h2)


def draw_streams(population: Population, capacity, chunk: int, rng: np.random.Generator,
                 device="cpu", stride: int = 1) -> list[S.Stream]:
    """A stream of `capacity[g]` fresh samples for every group."""
    capacity = [int(c) for c in capacity]
    if len(capacity) != population.n_groups:
        raise ValueError(f"capacity needs one value per group ({population.n_groups})")
    return [S.Stream(*population.sample(g, c, rng), chunk, device, stride)
            for g, c in enumerate(capacity)]



# -------------------------------------------------------------------------------------------------
# The study


@dataclass(frozen=True)
class Design:
    """The simulated population, the budget and the sampler's settings (notebook names)."""

    n_snps: int
    n_causal: int
    fst: float
    heritability: tuple
    rho: float
    shares: tuple  # population shares: what proportional sampling matches
    budget: float
    batch: int
    pilot_batches: int = 1
    n_folds: int = 5
    levels: tuple = (0.25, 0.5, 0.75)
    lambdas: tuple = tuple(np.logspace(0, 5, 21))
    weights: tuple | None = None  # objective weights; None: equal

    def __post_init__(self):
        G = len(self.heritability)
        if G < 2:
            raise ValueError("the study needs at least two groups")
        if len(self.shares) != G or (self.weights is not None and len(self.weights) != G):
            raise ValueError(f"shares and weights need one value per group ({G})")
        if self.batch % self.n_folds:
            raise ValueError(f"batch ({self.batch}) must split into n_folds ({self.n_folds}) "
                             "equal chunks")

    @property
    def n_groups(self) -> int:
        return len(self.heritability)

    def capacity(self, costs_list) -> list[int]:
        """Stream length per group: enough for the largest purchase any scenario allows."""
        most = np.max([self.budget / np.asarray(c, dtype=float) for c in costs_list], axis=0)
        return [int(np.ceil(m / self.batch) * self.batch) for m in most]


@dataclass
class SeedResult:
    table: pd.DataFrame  # one row per (costs, objective, strategy)
    paths: pd.DataFrame  # population R^2 per group along the spend, per strategy
    oracle: pd.DataFrame  # expected objective along the oracle's grid
    curve_check: pd.DataFrame  # learning-curve prediction against the realised R^2
    runs: dict = field(default_factory=dict)  # (objective, costs name) -> AdaptiveRun


def population_for(design: Design, seed: int) -> Population:
    """The population of a seed of the study (its own stream of the seed's random numbers)."""
    pop_seq = np.random.SeedSequence(seed).spawn(4)[0]
    return simulate_population(n_snps=design.n_snps, n_causal=design.n_causal, fst=design.fst,
                               heritability=design.heritability, rho=design.rho,
                               seed=int(pop_seq.generate_state(1)[0]))


def _fit_r2(streams, counts, population, lambdas) -> np.ndarray:
    _, w, mu = S.ridge_gcv(S.stats_of(streams, counts), lambdas)
    return population.r2(w, mu).cpu().numpy()


def _row(seed, costs_name, objective, strategy, counts, r2, design, costs) -> dict:
    row = {"seed": seed, "costs": costs_name, "objective": objective, "strategy": strategy,
           "value": float(S.objective_value(objective, torch.as_tensor(r2), design.weights)),
           "spent": float(np.asarray(counts) @ np.asarray(costs, dtype=float)),
           "share_last": float(counts[-1] / max(np.sum(counts), 1))}
    row.update({f"n{g}": int(c) for g, c in enumerate(counts)})
    row.update({f"r2_{g}": float(r) for g, r in enumerate(r2)})
    return row


def oracle_curves(population, design: Design, costs, replicates, steps: int, objectives,
                  lambdas) -> tuple[np.ndarray, dict]:
    """The budget grid and, per objective, the objective averaged over replicate streams."""
    grid = S.budget_grid(design.budget, costs, steps)
    r2 = np.stack([[_fit_r2(streams, c, population, lambdas) for c in grid]
                   for streams in replicates])  # (R, P, G)
    values = {obj: S.objective_value(obj, torch.as_tensor(r2), design.weights).numpy().mean(0)
              for obj in objectives}
    return grid, values


def curve_check(run: S.AdaptiveRun, streams, population, design: Design, costs) -> list[dict]:
    """Does the learning curve fitted at half the budget predict a group's R^2 at its final count?

    For each group, the curve fitted in the first round at or past half the spend predicts the
    R^2 at the group's final count; the realised value is the population R^2 of the model fitted
    with that group at its final count and every other group as it was then.
    """
    if len(run.chosen) == 0:
        return []
    spent = run.counts @ np.asarray(costs, dtype=float)
    t = int(np.argmax(spent[:-1] >= design.budget / 2))
    rows = []
    for g in range(run.counts.shape[1]):
        n_final = int(run.counts[-1, g])
        counts = run.counts[t].copy()
        counts[g] = n_final
        actual = _fit_r2(streams, counts, population, design.lambdas)[g]
        predicted = float(S.predict_learning_curve(run.curves[t, g], n_final))
        rows.append({"group": g, "round": t, "n_then": int(run.counts[t, g]), "n_final": n_final,
                     "predicted": predicted, "actual": float(actual),
                     "error": predicted - float(actual)})
    return rows


def run_seed(design: Design, seed: int, *, costs: dict, scenarios, objectives, oracle_steps: int,
             oracle_replicates: int, path_points: int = 10, headline: str = "maxmin",
             device="cpu") -> SeedResult:
    """Every strategy on one population; `scenarios` lists the (objective, costs name) pairs
    that get an adaptive run, `objectives` those every fixed strategy and the oracle are scored
    on."""
    for obj, name in scenarios:
        if obj not in objectives or name not in costs:
            raise ValueError(f"scenario ({obj}, {name}) needs its objective in {objectives} and "
                             f"its costs in {sorted(costs)}")
    first = next(iter(costs))
    _, eval_seq, oracle_seq, sampler_seq = np.random.SeedSequence(seed).spawn(4)
    population = population_for(design, seed)
    capacity = design.capacity(list(costs.values()))
    chunk = design.batch // design.n_folds
    streams = draw_streams(population, capacity, chunk, np.random.default_rng(eval_seq), device,
                             stride=design.n_folds)
    rows, paths, oracle_rows, checks, runs = [], [], [], [], {}

    for i, (obj, name) in enumerate(scenarios):
        run = S.adaptive_sampling(
            streams, budget=design.budget, costs=costs[name], objective=obj,
            weights=design.weights, batch=design.batch, pilot_batches=design.pilot_batches,
            n_folds=design.n_folds, levels=design.levels, lambdas=design.lambdas,
            seed=int(sampler_seq.spawn(len(scenarios))[i].generate_state(1)[0]))
        runs[(obj, name)] = run
        r2_path = population.r2(run.w, run.mu).cpu().numpy()
        rows.append(_row(seed, name, obj, "adaptive", run.final_counts, r2_path[-1], design,
                         costs[name]))
        if name == first and obj == headline:
            checks += [{"seed": seed, **r}
                       for r in curve_check(run, streams, population, design, costs[name])]
        for t, (c, r2) in enumerate(zip(run.counts, r2_path, strict=True)):
            paths.append({"seed": seed, "costs": name, "strategy": f"adaptive ({obj})", "step": t,
                          "spent": float(c @ np.asarray(costs[name], dtype=float)),
                          **{f"r2_{g}": v for g, v in enumerate(r2)},
                          **{f"n{g}": int(v) for g, v in enumerate(c)}})

    for name, cost in costs.items():
        for kind in S.FIXED:
            counts = S.fixed_allocation(kind, design.budget, cost, design.shares)
            r2 = _fit_r2(streams, counts, population, design.lambdas)
            rows += [_row(seed, name, obj, kind, counts, r2, design, cost) for obj in objectives]
            if name != first:
                continue
            for spend in np.linspace(design.budget / path_points, design.budget, path_points):
                c = S.fixed_allocation(kind, spend, cost, design.shares)
                r2 = _fit_r2(streams, c, population, design.lambdas)
                paths.append({"seed": seed, "costs": name, "strategy": kind, "spent": float(spend),
                              **{f"r2_{g}": v for g, v in enumerate(r2)},
                              **{f"n{g}": int(v) for g, v in enumerate(c)}})

    # Replicate streams are only cut at the grid's counts: chunks as long as those allow.
    counts = np.concatenate([S.budget_grid(design.budget, c, oracle_steps).ravel()
                             for c in costs.values()] + [capacity])
    step = int(np.gcd.reduce(counts[counts > 0]))
    step = step if step >= chunk else chunk
    oracle_rng = np.random.default_rng(oracle_seq)
    replicates = [draw_streams(population, capacity, step, oracle_rng, device)
                  for _ in range(oracle_replicates)]
    for name, cost in costs.items():
        grid, values = oracle_curves(population, design, cost, replicates, oracle_steps,
                                     objectives, design.lambdas)
        for obj, v in values.items():
            best = grid[int(np.argmax(v))]
            r2 = _fit_r2(streams, best, population, design.lambdas)
            rows.append(_row(seed, name, obj, "oracle", best, r2, design, cost))
            oracle_rows += [{"seed": seed, "costs": name, "objective": obj,
                             "share_last": float(c[-1] / c.sum()), "expected": float(e)}
                            for c, e in zip(grid, v, strict=True)]
    return SeedResult(pd.DataFrame(rows), pd.DataFrame(paths), pd.DataFrame(oracle_rows),
                      pd.DataFrame(checks), runs)


def run_study(design: Design, seeds, **kwargs) -> SeedResult:
    """`run_seed` for every seed, with a progress bar; the tables are concatenated."""
    parts = [run_seed(design, s, **kwargs) for s in bar(seeds, desc="seeds")]
    runs = {(s, *key): run for s, p in zip(seeds, parts, strict=True)
            for key, run in p.runs.items()}
    return SeedResult(*(pd.concat([getattr(p, f) for p in parts], ignore_index=True)
                        for f in ("table", "paths", "oracle", "curve_check")), runs=runs)


def per_seed(table: pd.DataFrame, strategy: str, objective: str, costs: str,
             column: str = "value") -> np.ndarray:
    """One value per seed, in seed order, for a paired comparison."""
    rows = table[(table.strategy == strategy) & (table.objective == objective)
                 & (table.costs == costs)].sort_values("seed")
    if rows.empty:
        raise ValueError(f"no rows for strategy={strategy!r}, objective={objective!r}, "
                         f"costs={costs!r}")
    return rows[column].to_numpy()


def share_of(table: pd.DataFrame, groups) -> pd.Series:
    """Share of the samples a row bought from `groups`."""
    counts = table.filter(regex=r"^n\d+$")
    if counts.empty:
        raise ValueError("the table has no per-group count columns n0, n1, ...")
    return counts[[f"n{g}" for g in groups]].sum(1) / counts.sum(1).clip(lower=1)


def summarise(table: pd.DataFrame, columns=("value",)) -> pd.DataFrame:
    """Mean and 95% t interval over seeds for every (costs, objective, strategy)."""
    rows = []
    for key, g in table.groupby(["costs", "objective", "strategy"], sort=False):
        row = dict(zip(("costs", "objective", "strategy"), key, strict=True))
        for col in columns:
            ci = mean_ci(g.sort_values("seed")[col].to_numpy())
            row[col] = ci["mean"]
            row[f"{col} 95% CI"] = f"[{ci['ci95'][0]:.3f}, {ci['ci95'][1]:.3f}]"
        rows.append(row)
    return pd.DataFrame(rows).set_index(["costs", "objective", "strategy"])
