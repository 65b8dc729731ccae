"""lhtstream: real-time monitor for laser surface heat treatment thermal video."""

__version__ = "0.1.0"
