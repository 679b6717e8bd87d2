"""Kept for tools that still call ``setup.py``: every setting, including the mapping of the
top-level ``kernels/`` folder onto ``npbptt.kernels``, is in pyproject.toml."""
from setuptools import setup

setup()
