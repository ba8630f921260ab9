"""Fairness and trustworthy prediction: group metrics, online streams, and the papers' methods
(each paper's method in its own module beside the shared ones)."""
