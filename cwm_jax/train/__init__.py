"""Training: the run config, optimizer, jitted train step and the training loop behind `train.py`."""
