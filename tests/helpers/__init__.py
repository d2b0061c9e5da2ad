"""Code the tests share: stores built from constructed arrays, small models, reference implementations.

Test modules import it as ``helpers`` (pytest puts tests/ on the path); Ray actors and subprocesses import
the models by their factory strings ``tests.helpers.models:<name>`` (the repository root is on their path).
"""
