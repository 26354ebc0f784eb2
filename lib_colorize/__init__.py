"""ColorizeDiffusion (Yan et al., arXiv 2401.01456), free of the webui: models, guidance, hooks, pipeline.

See docs/architecture.md for the map of modules; method sections cited in docstrings refer to the
specification the implementation follows.
"""

__version__ = "0.1.0"
