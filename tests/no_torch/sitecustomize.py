"""Imported first by every process that a test starts (conftest.py puts this directory on their
PYTHONPATH): torch, a dependency of the tests only, is hidden from them, so a run sees the
packages that `pip install -e .` gives a user, and transformers does not import torch in each
one (3.5 s of a 7.5 s micro run on this project's CPU)."""

import sys

sys.modules.setdefault('torch', None)  # find_spec('torch') is None and `import torch` fails.
