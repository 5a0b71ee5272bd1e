"""The package version (a leaf module: what writes it into manifests imports it from here)."""

__version__ = "0.1.0"
