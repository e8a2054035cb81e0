"""The version of edgelm, in one place: the package, its artifacts' provenance and `--version` read it."""

__version__ = "0.1.0"
