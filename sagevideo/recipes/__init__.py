"""Training recipes for the small models that ship with sagevideo.

Each recipe is a sub-package that can rebuild its bundled asset from nothing but the repository and its
seed (``python -m sagevideo.recipes.<name>.train``). Nothing here is imported by the core package.
"""
