"""Datasets and the in-memory training loader; see data/process_cifar.py."""
