"""Thin entry points: ``python -m jobs.<name>`` and the ``lrp-audit`` console script."""
