"""fusion_trainer: DeepSpeed ZeRO training of a frozen causal LM fused with a trainable climate encoder."""

__version__ = "0.1.0"

__all__ = ["__version__"]
