"""``subquad bench``: speed measured against the baselines in the same run.

Suites: ``families`` (every attention family against SDPA on CPU or GPU: table, CSV, PNG;
``families.py``), ``linear``, ``block-sparse`` and ``grid-conv`` (the Triton kernels' own benchmarks,
CUDA), ``dit`` (DiT training step and sampling per family against the SDPA DiT, CUDA), ``models``
(whole timm models against timm's dense peers, CUDA; ``models.py``), ``pipeline`` (FLUX- and Wan-sized
diffusers transformers, one call dense vs attention swaps, CUDA; ``pipelines.py``). ``run_suite``
in ``suites.py`` runs one; this module stays free of torch so that the CLI can list the suites.
"""
SUITES = ("families", "models", "linear", "block-sparse", "grid-conv", "dit", "pipeline")
