"""Numba kernels for npbptt's hot loops (installed as ``npbptt.kernels``).

Each kernel names in its docstring the NumPy reference function it must equal;
``npbptt.backends`` decides which one runs.
"""
