"""cullmt-ray: distributed search for smaller multilingual MT models (layer and expert pruning)."""

__version__ = "0.2.0"
