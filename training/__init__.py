"""The continual benchmark (``python -m training.continual``): CA-SAM vs baselines on real data."""
