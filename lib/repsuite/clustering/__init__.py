"""Clustering: k-means and Gaussian mixtures in PyTorch, clustering metrics, and the papers'
procedures (each paper's method in its own module beside the shared ones)."""
