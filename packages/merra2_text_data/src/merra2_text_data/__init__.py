"""merra2_text_data: NASA MERRA-2 reanalysis to validated climate-text pairs in versioned WebDataset shards."""

__version__ = "0.1.0"

__all__ = ["__version__"]
