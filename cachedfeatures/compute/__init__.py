"""Computing features: the sample layout, fingerprints, modes, spot checks, running the module.

Imports the store, the reader, the format layer and the base; never the pipeline or the faces.
"""
