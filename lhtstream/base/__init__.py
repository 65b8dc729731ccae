"""Lowest layer: the error base class and small helpers every layer may use."""
