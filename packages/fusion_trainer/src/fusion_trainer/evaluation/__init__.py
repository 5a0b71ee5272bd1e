"""Evaluation of a trained run: losses and grounding gains, the baseline ladder, interventions, generation, the
report and the model card."""
