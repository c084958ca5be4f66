"""One file per stage or task: its objective, LR groups and evaluation, plugged into the one training loop."""
