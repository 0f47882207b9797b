"""Swin-layout models: the papers' block layouts (kept when depths change), and the generic model's
default against timm's Swin."""
import pytest
import timm
import torch

SMALL = dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2))  # narrow, shallow: fast

# per stage, the attention of each block (official cfgs/*_swin_*.yaml): A agent, L focused linear, W windows
LAYOUTS = {
    "agent_swin_tiny_patch4_window7_224": ("AA", "AA", "AAAAAA", "WW"),
    "agent_swin_small_patch4_window7_224": ("AA", "AA", "W" * 18, "WW"),
    "agent_swin_base_patch4_window7_224": ("AA", "AA", "AA" + "W" * 16, "WW"),
    "flatten_swin_tiny_patch4_window7_224": ("LL", "LL", "W" * 6, "WW"),
    "flatten_swin_small_patch4_window7_224": ("LL", "LL", "W" * 18, "WW"),
    "flatten_swin_base_patch4_window7_224": ("LL", "LL", "W" * 18, "WW"),
    "agent_swin_small_patch4_window9_288": ("AA", "AA", "W" * 18, "WW"),
    "agent_swin_base_patch4_window12_384": ("AA", "AA", "AA" + "W" * 16, "WW"),
    "flatten_swin_base_patch4_window12_384": ("LL", "LL", "W" * 18, "WW"),
}
KINDS = {"A": "agent", "L": "focused_linear", "W": "window"}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_paper_block_layout(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.attn_schedule.names == [KINDS[k] for stage in LAYOUTS[name] for k in stage]
    windows = [b.attn for s in model.stages for b in s.blocks if b.attn.family == "window"]
    window = int(name.split("window")[1].split("_")[0])      # Swin's windows: 7 at 224, 9 at 288, 12 at 384
    assert all(w.window_size == window for w in windows)
    side = int(name.rsplit("_", 1)[1]) // 4                 # the global blocks' maps are the stage maps
    maps = [getattr(b.attn, "bias_grid", None) or b.attn.pos_grid
            for s in model.stages for b in s.blocks if b.attn.family != "window"]
    assert maps[0] == (side, side) and maps[-1] in {(side // 2, side // 2), (side // 4, side // 4)}


def test_changed_depths_keep_the_paper_attention_in_leading_blocks():
    with torch.device("meta"):
        model = timm.create_model("agent_swin_base_patch4_window7_224", depths=(1, 3, 4, 2))
        mala = timm.create_model("agent_swin_base_patch4_window7_224", attn="mala")
    assert model.attn_schedule.names == ["agent"] * 1 + ["agent"] * 2 + ["window"] + ["agent"] * 2 + ["window"] * 4
    assert set(mala.attn_schedule.names) == {"mala"}


def test_default_generic_model_is_timm_swin():
    """Swin's layout and shifted windows, exactly (narrow and shallow for speed; Swin-T matches too)."""
    ref = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, num_heads=(1, 2, 4, 8),
                            depths=(2, 2, 2, 2)).eval()
    ours = timm.create_model("subquad_hier_tiny", **SMALL).eval()
    state = {k.replace("layers.", "stages."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
