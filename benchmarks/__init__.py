"""Benchmarks: convbn against each framework's own layers, and checkpoint-conversion cost.

Run ``python -m benchmarks.run`` (see ``--help``); results go to ``benchmarks/results/``.
"""
