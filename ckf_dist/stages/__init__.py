"""The pipeline's stages, one module per command: prepare, train, consolidate, evaluate, demo.

Each stage orchestrates components (``data``, ``cf``, ``model``, ``kernels``, ``train``,
``checkpoint``, ``eval``); no component imports a stage, and ``ckf_dist.cli`` calls stages.
"""
