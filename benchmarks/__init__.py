"""Benchmarks of django_workitems: ``python -m benchmarks [--quick]`` (or ``make bench``).

Every figure is set against a baseline measured in the same run, on the same machine, so the
ratios mean something on shared, noisy hosts. See ``benchmarks/__main__.py``.
"""
