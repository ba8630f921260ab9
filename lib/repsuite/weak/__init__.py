"""Weak supervision from aggregates: bags of instances with only a bag-level response or label
proportion, and the papers' estimators (each in its own module beside the shared bags module)."""
