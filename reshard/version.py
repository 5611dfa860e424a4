"""The version, at the bottom of the package so that every stage may read it."""

__version__ = "0.1.0"
