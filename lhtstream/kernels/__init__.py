"""Numba kernels: pure functions over arrays (spot measurement, phase tracking, ring buffer)."""
