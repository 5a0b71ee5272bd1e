"""The fusion model: a frozen pretrained causal LM (base.py, registry.py), the climate encoder, the fusion modules,
the readout line, the training pass (lm_pass.py), generation and the adapter files."""
