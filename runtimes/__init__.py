"""Runtimes: one small protocol, one module per inference engine."""
