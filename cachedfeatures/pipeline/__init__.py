"""torchdata.nodes stages, the loader, prefill and samplers, against :class:`CachedSource`.

Imports compute, pruning, the store and below; never the dataset, which satisfies the protocol.
"""

from cachedfeatures.pipeline.nodes import CachedSource, Loader

__all__ = ["CachedSource", "Loader"]
