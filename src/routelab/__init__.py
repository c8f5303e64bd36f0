"""routelab: Mixture-of-Experts routing experiments as a reproducible Snakemake pipeline."""

__version__ = "0.1.0"
