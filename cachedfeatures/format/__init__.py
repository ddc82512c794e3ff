"""The store's on-disk format: array and attribute names, chunk keys, versions, array specs.

Leaf layer above the base (``errors``, ``units``): it imports nothing else of the package, and
everything that reads or writes a store takes its names from here.
"""
