"""The package version (a leaf module: what writes it into files imports it from here, not from the package)."""

__version__ = "0.1.0"
