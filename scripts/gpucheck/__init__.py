"""Helpers of scripts/gpu-selfcheck.py: the context and results (`common`), the checks of the training path
(`train_checks`: 1-7) and of the scales, throughput, int8 evaluation and launcher (`scale_checks`: 8-12).
Not a test module: pytest collects tests/ only, and nothing here is named test_*."""
