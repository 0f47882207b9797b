"""Accelerate a diffusers pipeline: structured attention over the latent tokens of its transformer(s).

    handle = subquad.accelerate_pipeline(pipe, attn="radial", dense_steps=2)
    ...
    handle.restore()
"""
from .accelerate import AttentionSwap, accelerate_pipeline, supported_transformers
from .compare import compare_pipeline
from .families import pipeline_families

__all__ = ["AttentionSwap", "accelerate_pipeline", "compare_pipeline", "pipeline_families", "supported_transformers"]
