"""The package's version: a leaf that imports nothing, so any module may read it.

Layer: base, below everything (see "Layout" in the README).
"""

__version__ = "0.1.0"
