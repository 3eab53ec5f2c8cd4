"""A seeded mutation fuzzer for the five checkpoint readers (``python -m tests.fuzz --help``).

``seeds`` builds small real checkpoints per format, ``mutate`` damages them reproducibly, and
``runner`` feeds each mutant to ``load_checkpoint``, ``convbn inspect`` and ``convbn convert`` in
worker processes, grouping every outcome that is not a clean load or a one-line ``ConvBNError``.
"""
