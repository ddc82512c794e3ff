"""The package's version: a leaf that imports nothing, so any module may read it."""

__version__ = "0.1.0"
"""The version of the installed package, as in ``pip show cachedfeatures``."""
