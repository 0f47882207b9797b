"""subquad.backbones: timm-registered models (importing this registers them)."""
from . import subquad_deit
from .attention_schedule import AttentionSchedule
from .vit import GridBlock, GridVisionTransformer

__all__ = ["AttentionSchedule", "GridBlock", "GridVisionTransformer", "subquad_deit"]
from . import subquad_dit  # noqa: E402
from .dit import DiT  # noqa: E402
from . import subquad_hier, subquad_mavit, subquad_nat, subquad_pvt, subquad_swin  # noqa: E402
from .hierarchical import HierarchicalTransformer  # noqa: E402
