"""subquad: vision and diffusion backbones on efficient attention.

``import subquad`` registers every model with timm: ``timm.create_model("agent_deit_tiny_patch16_224")``.
"""
from . import attention, backbones, kernels
from .tasks.accelerate_pipeline import accelerate_pipeline

__version__ = "0.1.0"
__all__ = ["accelerate_pipeline", "attention", "backbones", "kernels"]
