"""DeepSpeed ZeRO training: the loop (train.py) in named steps (steps.py), checkpoints, ranks and the launcher."""
