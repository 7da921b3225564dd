"""Kernels behind the compiled backends (Numba here; Cython in ``fastmask/_kernels.pyx``).

Nothing here is imported when ``fastmask`` is: Numba loads on first use.
"""
