"""Reading rows fast: chunk-aware reads, the decoded-chunk cache, validity signatures.

Imports only the format layer and the base. :class:`ChunkReader` is the public face.
"""

from cachedfeatures.reader.chunk_reader import ChunkReader

__all__ = ["ChunkReader"]
