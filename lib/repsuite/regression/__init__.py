"""Regression beyond the conditional mean: quantile models and their aggregation, ordinal
regression (each paper's method in its own module)."""
