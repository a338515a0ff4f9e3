"""Experiments over many runs: experiment lists (``sweep``), the comparison report and its plots, published
numbers to compare with, and training FLOPs. Builds on :mod:`dynsparse.training`; of the command line it
uses only :mod:`dynsparse.cli.flags`, because a sweep's job is a ``dynsparse train`` command line."""
