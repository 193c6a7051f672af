"""Benchmarks and the reproduction report of CKA Prune (``python -m benchmarks.run [--quick]``).

Each module writes JSON under ``benchmarks/results/``; :mod:`benchmarks.run` runs them all and writes
``results/REPORT.md`` and the plots. See ``benchmarks/README.md``.
"""
