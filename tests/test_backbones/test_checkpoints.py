"""Official checkpoints: the key set each official model has, written down as data from the official
module structure (key patterns and shapes per block, the configs from the official cfgs/entrypoints),
goes through our checkpoint_filter_fn and must give exactly our model's keys with our shapes, with
no parameter lost on the way; strict loading names what does not match."""
import re

import pytest
import timm
import torch

from subquad.backbones import cswin, mavit, nat, pvt, pvt_v2, swin


# --- the official module structures as data ---------------------------------------------------

def linear(name, out, inp, bias=True):
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def conv(name, out, inp, k, bias=True):
    return {f"{name}.weight": (out, inp, k, k), **({f"{name}.bias": (out,)} if bias else {})}


def norm(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def batchnorm(name, c):
    stats = {f"{name}.running_mean": (c,), f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}
    return {**norm(name, c), **stats}


def prefixed(prefix, keys):
    return {f"{prefix}.{k}": v for k, v in keys.items()}


def agent_params(c, h, n, side):  # Agent-Swin/PVT AgentAttention, beyond q/k/v/proj
    return {**conv("dwc", c, 1, 3), "an_bias": (h, n, 7, 7), "na_bias": (h, n, 7, 7), "ah_bias": (1, h, n, side, 1),
            "aw_bias": (1, h, n, 1, side), "ha_bias": (1, h, side, 1, n), "wa_bias": (1, h, 1, side, n)}


def flatten_params(c, h, side):  # FLatten FocusedLinearAttention, beyond q/k/v/proj: one head_dim DWC for all heads
    return {**conv("dwc", c // h, 1, 5), "scale": (1, 1, c), "positional_encoding": (1, side * side, c)}


AGENTS = (9, 16, 49, 49)

# Agent-Swin / FLatten-Swin (agent_swin.py, flatten_swin.py; cfgs/*_swin_*.yaml): C, depths, heads, block kinds
# per stage: A agent / L focused linear, both with a window = the stage map; W Swin windows (7 at 224: the
# official max(7, window // 8) at 288 and 384), shift on odd blocks; the resolution and W's window last
OFFICIAL_SWIN = {
    "agent_swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), ("AA", "AA", "AAAAAA", "WW"), 224, 7),
    "agent_swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), ("AA", "AA", "W" * 18, "WW"), 224, 7),
    "agent_swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), ("AA", "AA", "AA" + "W" * 16, "WW"),
                                           224, 7),
    "flatten_swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), ("LL", "LL", "W" * 6, "WW"), 224, 7),
    "flatten_swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), ("LL", "LL", "W" * 18, "WW"), 224, 7),
    "flatten_swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), ("LL", "LL", "W" * 18, "WW"), 224, 7),
    "agent_swin_small_patch4_window9_288": (96, (2, 2, 18, 2), (3, 6, 12, 24), ("AA", "AA", "W" * 18, "WW"), 288, 9),
    "agent_swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), ("AA", "AA", "AA" + "W" * 16, "WW"),
                                            384, 12),
    "flatten_swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), ("LL", "LL", "W" * 18, "WW"),
                                              384, 12),
}


def official_swin(name):
    c0, _, heads, kinds, size, window = OFFICIAL_SWIN[name]
    keys = {**conv("patch_embed.proj", c0, 3, 4), **norm("patch_embed.norm", c0)}
    for i, (h, stage) in enumerate(zip(heads, kinds)):
        c, side = c0 * 2 ** i, size // 4 // 2 ** i
        w = min(window, side)                    # Swin shrinks a window to the map (and does not shift it)
        for j, kind in enumerate(stage):
            block = {**norm("norm1", c), **linear("attn.qkv", 3 * c, c), **linear("attn.proj", c, c),
                     **norm("norm2", c), **linear("mlp.fc1", 4 * c, c), **linear("mlp.fc2", c, 4 * c)}
            if kind == "A":
                block.update(prefixed("attn", agent_params(c, h, AGENTS[i], side)))
            elif kind == "L":
                block.update(prefixed("attn", flatten_params(c, h, side)))
            else:  # persistent buffers of Swin's WindowAttention and block (the mask only where windows shift)
                block.update({"attn.relative_position_bias_table": ((2 * w - 1) ** 2, h),
                              "attn.relative_position_index": (w * w, w * w)})
                if j % 2 and side > w:
                    block["attn_mask"] = ((side // w) ** 2, w * w, w * w)
            keys.update(prefixed(f"layers.{i}.blocks.{j}", block))
        if i < 3:
            keys.update({**linear(f"layers.{i}.downsample.reduction", 2 * c, 4 * c, bias=False),
                         **norm(f"layers.{i}.downsample.norm", 4 * c)})
    return {**keys, **norm("norm", c0 * 8), **linear("head", 1000, c0 * 8)}


# Agent-PVT / FLatten-PVT (agent_pvt.py, flatten_pvt.py): PVT v1 with sr ratio 1 for their attention
PVT_DEPTHS = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}
OFFICIAL_PVT = [f"{f}_pvt_{s}" for f in ("agent", "flatten") for s in PVT_DEPTHS] + ["agent_pvt_medium_256"]


def official_pvt(name):
    family, _, size, *resolution = name.split("_")
    resolution = int(resolution[0]) if resolution else 224
    dims, heads, ratios = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4)
    keys = {}
    for i, depth in enumerate(PVT_DEPTHS[size]):
        c, h, side, inp = dims[i], heads[i], resolution // 4 // 2 ** i, dims[i - 1] if i else 3
        keys.update({**conv(f"patch_embed{i + 1}.proj", c, inp, 4 if i == 0 else 2),
                     **norm(f"patch_embed{i + 1}.norm", c), f"pos_embed{i + 1}": (1, side * side, c)})
        for j in range(depth):
            block = {**norm("norm1", c), **linear("attn.q", c, c), **linear("attn.kv", 2 * c, c),
                     **linear("attn.proj", c, c), **norm("norm2", c), **linear("mlp.fc1", ratios[i] * c, c),
                     **linear("mlp.fc2", c, ratios[i] * c)}
            extra = agent_params(c, h, AGENTS[i], side) if family == "agent" else flatten_params(c, h, side)
            keys.update(prefixed(f"block{i + 1}.{j}", {**block, **prefixed("attn", extra)}))
    if family == "flatten":  # defined, never applied in forward
        keys.update(norm("norm", 512))
    return {**keys, **linear("head", 1000, 512)}


# FLatten-PVTv2 (flatten_pvt_v2.py): PVTv2 with sr ratio 1 for the focused linear attention
OFFICIAL_PVT_V2 = {"b0": ((32, 64, 160, 256), (2, 2, 2, 2)), "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
                   "b2": ((64, 128, 320, 512), (3, 4, 6, 3)), "b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
                   "b4": ((64, 128, 320, 512), (3, 8, 27, 3))}


def official_pvt_v2(name):
    dims, depths = OFFICIAL_PVT_V2[name.rsplit("_", 1)[1]]
    heads, ratios = (1, 2, 5, 8), (8, 8, 4, 4)
    keys = {}
    for i, depth in enumerate(depths):
        c, h, side, inp, f = dims[i], heads[i], 56 // 2 ** i, dims[i - 1] if i else 3, ratios[i] * dims[i]
        keys.update({**conv(f"patch_embed{i + 1}.proj", c, inp, 7 if i == 0 else 3),
                     **norm(f"patch_embed{i + 1}.norm", c), **norm(f"norm{i + 1}", c)})
        for j in range(depth):
            block = {**norm("norm1", c), **linear("attn.q", c, c), **linear("attn.kv", 2 * c, c),
                     **linear("attn.proj", c, c), **prefixed("attn", flatten_params(c, h, side)), **norm("norm2", c),
                     **linear("mlp.fc1", f, c), **conv("mlp.dwconv.dwconv", f, 1, 3), **linear("mlp.fc2", c, f)}
            keys.update(prefixed(f"block{i + 1}.{j}", block))
    return {**keys, **linear("head", 1000, dims[-1])}


# MAViT (classfication_release/model.py, MALA_T/S/B/L): dims, depths, heads, head projection, layer scale
OFFICIAL_MAVIT = {
    "mavit_tiny": ((64, 128, 256, 512), (2, 2, 6, 2), (1, 2, 4, 8), 2048),
    "mavit_small": ((64, 128, 320, 512), (3, 5, 9, 3), (1, 2, 5, 8), 2048),
    "mavit_base": ((96, 192, 384, 512), (4, 6, 12, 6), (1, 2, 6, 8), 2048),
    "mavit_large": ((96, 192, 448, 640), (4, 7, 19, 8), (1, 2, 7, 10), 2560),
}


def official_mavit(name):
    dims, depths, heads, proj = OFFICIAL_MAVIT[name]
    half = dims[0] // 2
    keys = {}
    for idx, (out, inp) in zip((0, 3, 6, 9), ((half, 3), (half, half), (half, half), (dims[0], half))):
        keys.update({**conv(f"patch_embed.proj.{idx}", out, inp, 3), **batchnorm(f"patch_embed.proj.{idx + 1}", out)})
    for i, (c, depth, h) in enumerate(zip(dims, depths, heads)):
        f = int(c * 3.5)
        keys[f"layers.{i}.RoPE.angle"] = (c // h // 2,)
        for j in range(depth):
            keys.update(prefixed(f"layers.{i}.blocks.{j}", {
                **conv("pos", c, 1, 3), **norm("norm1.norm", c), **conv("attn.qkvo", 4 * c, c, 1),
                **conv("attn.lepe", c, 1, 5), **conv("attn.proj", c, c, 1), **norm("norm2.norm", c),
                **conv("ffn.fc1", f, c, 1), **conv("ffn.fc2", c, f, 1), **conv("ffn.dwconv", f, 1, 3),
                "gamma_1": (1, c, 1, 1), "gamma_2": (1, c, 1, 1)}))
        if i < 3:
            keys.update({**conv(f"layers.{i}.downsample.reduction", dims[i + 1], c, 3),
                         **batchnorm(f"layers.{i}.downsample.norm", dims[i + 1])})
    return {**keys, **conv("proj", proj, dims[-1], 1), **batchnorm("norm", proj), **conv("head", 1000, proj, 1)}


# NAT / DiNAT (classification/nat.py, dinat.py): C, depths, heads, MLP ratio, layer scale (same keys for DiNAT)
OFFICIAL_NAT = {
    "mini": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3, {"nat": False, "dinat": False}),
    "tiny": (64, (3, 4, 18, 5), (2, 4, 8, 16), 3, {"nat": False, "dinat": False}),
    "small": (96, (3, 4, 18, 5), (3, 6, 12, 24), 2, {"nat": True, "dinat": False}),
    "base": (128, (3, 4, 18, 5), (4, 8, 16, 32), 2, {"nat": True, "dinat": True}),
    "large": (192, (3, 4, 18, 5), (6, 12, 24, 48), 2, {"dinat": False}),
}
# the DiNAT-Large variants (dinat_large, dinat_large_384, dinat_large_384_11x11): kernel size of each
NAT_VARIANTS = {"nat_mini": 7, "nat_tiny": 7, "nat_small": 7, "nat_base": 7, "dinat_mini": 7, "dinat_tiny": 7,
                "dinat_small": 7, "dinat_base": 7, "dinat_large": 7, "dinat_large_384": 7, "dinat_large_384_11x11": 11}


def official_nat(name):
    family, size = name.split("_")[:2]
    k = NAT_VARIANTS[name]
    c0, depths, heads, ratio, layer_scale = OFFICIAL_NAT[size]
    keys = {**conv("patch_embed.proj.0", c0 // 2, 3, 3), **conv("patch_embed.proj.1", c0, c0 // 2, 3),
            **norm("patch_embed.norm", c0)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = c0 * 2 ** i
        for j in range(depth):
            block = {**norm("norm1", c), **linear("attn.qkv", 3 * c, c), "attn.rpb": (h, 2 * k - 1, 2 * k - 1),
                     **linear("attn.proj", c, c), **norm("norm2", c), **linear("mlp.fc1", ratio * c, c),
                     **linear("mlp.fc2", c, ratio * c)}
            if layer_scale[family]:
                block.update({"gamma1": (c,), "gamma2": (c,)})
            keys.update(prefixed(f"levels.{i}.blocks.{j}", block))
        if i < 3:
            keys.update({**conv(f"levels.{i}.downsample.reduction", 2 * c, c, 3, bias=False),
                         **norm(f"levels.{i}.downsample.norm", 2 * c)})
    return {**keys, **norm("norm", c0 * 8), **linear("head", 1000, c0 * 8)}


# DiNAT_s (classification/dinats.py): Swin's layout with NATTEN's attention (qkv, rpb, proj) in every block
OFFICIAL_DINAT_S = {"dinat_s_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
                    "dinat_s_small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
                    "dinat_s_base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
                    "dinat_s_large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
                    "dinat_s_large_384": (192, (2, 2, 18, 2), (6, 12, 24, 48))}


def official_dinat_s(name):
    c0, depths, heads = OFFICIAL_DINAT_S[name]
    keys = {**conv("patch_embed.proj", c0, 3, 4), **norm("patch_embed.norm", c0)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = c0 * 2 ** i
        for j in range(depth):
            keys.update(prefixed(f"layers.{i}.blocks.{j}", {
                **norm("norm1", c), **linear("attn.qkv", 3 * c, c), "attn.rpb": (h, 13, 13),
                **linear("attn.proj", c, c), **norm("norm2", c), **linear("mlp.fc1", 4 * c, c),
                **linear("mlp.fc2", c, 4 * c)}))
        if i < 3:
            keys.update({**linear(f"layers.{i}.downsample.reduction", 2 * c, 4 * c, bias=False),
                         **norm(f"layers.{i}.downsample.norm", 4 * c)})
    return {**keys, **norm("norm", c0 * 8), **linear("head", 1000, c0 * 8)}


# Agent-CSWin / FLatten-CSWin (agent_cswin.py, flatten_cswin.py; cfgs/*_cswin_*.yaml): C, depths, heads, block kind
# per stage (A agent / L focused linear over the whole stage map; S CSWin's cross-shaped windows, two branches
# unless the stripe is the map), the resolution and the stripe width (split size) of stage 3
OFFICIAL_CSWIN = {
    "agent_cswin_tiny_224": (64, (2, 4, 18, 1), (2, 4, 8, 16), "AASS", 224, 7),
    "agent_cswin_small_224": (64, (3, 6, 29, 2), (2, 4, 8, 16), "AASS", 224, 7),
    "agent_cswin_base_224": (96, (3, 6, 29, 2), (4, 8, 16, 32), "AASS", 224, 7),
    "agent_cswin_base_384": (96, (3, 6, 29, 2), (4, 8, 16, 32), "AASS", 384, 12),
    "flatten_cswin_tiny_224": (64, (2, 4, 18, 1), (2, 4, 8, 16), "LLSS", 224, 7),
    "flatten_cswin_small_224": (64, (2, 4, 32, 2), (2, 4, 8, 16), "LLSS", 224, 7),
    "flatten_cswin_base_224": (96, (3, 6, 29, 2), (4, 8, 16, 32), "LLSS", 224, 7),
    "flatten_cswin_base_384": (96, (3, 6, 29, 2), (4, 8, 16, 32), "LLSS", 384, 12),
}


def official_cswin(name):
    c0, depths, heads, kinds, size, stripe = OFFICIAL_CSWIN[name]
    keys = {**conv("stage1_conv_embed.0", c0, 3, 7), **norm("stage1_conv_embed.2", c0)}
    for i, (depth, h, kind) in enumerate(zip(depths, heads, kinds)):
        c, side = c0 * 2 ** i, size // 4 // 2 ** i
        for j in range(depth):
            block = {**norm("norm1", c), **linear("qkv", 3 * c, c), **linear("proj", c, c), **norm("norm2", c),
                     **linear("mlp.fc1", 4 * c, c), **linear("mlp.fc2", c, 4 * c)}
            if kind == "A":
                agent = {k: v for k, v in agent_params(c, h, AGENTS[i], side).items() if not k.startswith("dwc")}
                block.update(prefixed("attns.0", {**conv("get_v", c, 1, 3), **agent}))
            elif kind == "L":
                block.update(prefixed("attns.0", {**conv("get_v", c, 1, 3), **flatten_params(c, h, side)}))
            elif i == 3 or side == stripe:    # one branch over the whole map
                block.update(conv("attns.0.get_v", c, 1, 3))
            else:
                block.update({**conv("attns.0.get_v", c // 2, 1, 3), **conv("attns.1.get_v", c // 2, 1, 3)})
            keys.update(prefixed(f"stage{i + 1}.{j}", block))
        if i < 3:
            keys.update({**conv(f"merge{i + 1}.conv", 2 * c, c, 3), **norm(f"merge{i + 1}.norm", 2 * c)})
    return {**keys, **norm("norm", c0 * 8), **linear("head", 1000, c0 * 8)}


# official keys the conversion drops on purpose: buffers we recompute, FLatten-PVT's unused final norm
DROPPED = {"swin": r"(relative_position_index|attn_mask)$", "pvt": r"^norm\.", "mavit": r"\.RoPE\.angle$", "nat": r"^$",
           "pvt_v2": r"^$", "cswin": r"^$"}
CASES = ([(n, "swin", official_swin, swin) for n in OFFICIAL_SWIN]
         + [(n, "pvt", official_pvt, pvt) for n in OFFICIAL_PVT]
         + [(f"flatten_pvt_v2_{b}", "pvt_v2", official_pvt_v2, pvt_v2) for b in OFFICIAL_PVT_V2]
         + [(n, "mavit", official_mavit, mavit) for n in OFFICIAL_MAVIT]
         + [(n, "nat", official_nat, nat) for n in NAT_VARIANTS]
         + [(n, "swin", official_dinat_s, nat.swin) for n in OFFICIAL_DINAT_S]
         + [(n, "cswin", official_cswin, cswin) for n in OFFICIAL_CSWIN])


def tensors(shapes, device="meta"):
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.empty(s, device="meta") if device == "meta" else torch.randn(s, generator=gen))
            for k, s in shapes.items()}


def numel(state):
    return sum(t.numel() for t in state.values())


@pytest.mark.parametrize("name, layout, official, module", CASES)
def test_conversion_covers_every_official_key(name, layout, official, module):
    with torch.device("meta"):
        model = timm.create_model(name)
    state = tensors(official(name))
    converted = module.checkpoint_filter_fn(state, model)        # raises on missing / unexpected keys
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    dropped = {k: v for k, v in state.items() if re.search(DROPPED[layout], k)}
    assert numel(converted) == numel(state) - numel(dropped), "a parameter was lost or invented in conversion"


def converted(name, official, module):
    """(an official state dict of ``name`` with random values, the same converted by ``module``'s filter)."""
    state = tensors(official(name), device="cpu")
    with torch.device("meta"):
        model = timm.create_model(name)
    return state, module.checkpoint_filter_fn(state, model)


def test_conversion_places_values():
    """Where the layouts differ, the numbers land in the right place."""
    pvt_state, out = converted("agent_pvt_tiny", official_pvt, pvt)
    qkv = out["stages.1.blocks.0.attn.qkv.weight"]
    assert torch.equal(qkv[:128], pvt_state["block2.0.attn.q.weight"])
    assert torch.equal(qkv[128:], pvt_state["block2.0.attn.kv.weight"])
    assert torch.equal(out["stages.2.downsample.proj.weight"], pvt_state["patch_embed3.proj.weight"])
    assert torch.equal(out["stages.3.pos_embed"], pvt_state["pos_embed4"])

    v2_state, out = converted("flatten_pvt_v2_b0", official_pvt_v2, pvt_v2)
    assert torch.equal(out["stages.1.blocks.1.mlp.dwconv.weight"], v2_state["block2.1.mlp.dwconv.dwconv.weight"])
    assert torch.equal(out["stages.2.norm.bias"], v2_state["norm3.bias"])
    assert torch.equal(out["stages.3.downsample.proj.weight"], v2_state["patch_embed4.proj.weight"])
    assert torch.equal(out["stages.0.blocks.0.attn.qkv.bias"][32:], v2_state["block1.0.attn.kv.bias"])

    mavit_state, out = converted("mavit_tiny", official_mavit, mavit)
    qkvo = mavit_state["layers.2.blocks.1.attn.qkvo.weight"].flatten(1)
    assert torch.equal(out["stages.2.blocks.1.attn.qkv.weight"], qkvo[:768])
    assert torch.equal(out["stages.2.blocks.1.attn.gate.weight"], qkvo[768:])
    assert torch.equal(out["stages.1.blocks.0.ls2.gamma"], mavit_state["layers.1.blocks.0.gamma_2"].flatten())
    assert torch.equal(out["stages.1.downsample.norm.running_var"], mavit_state["layers.0.downsample.norm.running_var"])
    assert torch.equal(out["head.fc.weight"], mavit_state["head.weight"].flatten(1))

    shapes = official_swin("agent_swin_tiny_patch4_window7_224")
    swin_state = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(shapes.items())}
    with torch.device("meta"):
        model = timm.create_model("agent_swin_tiny_patch4_window7_224")
    out = swin.checkpoint_filter_fn(swin_state, model)
    assert torch.equal(out["stages.1.downsample.reduction.weight"], swin_state["layers.0.downsample.reduction.weight"])
    assert torch.equal(out["head.fc.bias"], swin_state["head.bias"])


def test_cswin_conversion_places_values():
    """The two branches' LePE convs are concatenated (vertical stripes first); an agent block's LePE is its DWC."""
    state, out = converted("agent_cswin_tiny_224", official_cswin, cswin)
    assert torch.equal(out["stages.2.blocks.3.attn.lepe.weight"], torch.cat([state["stage3.3.attns.0.get_v.weight"],
                                                                            state["stage3.3.attns.1.get_v.weight"]]))
    assert torch.equal(out["stages.3.blocks.0.attn.lepe.bias"], state["stage4.0.attns.0.get_v.bias"])
    assert torch.equal(out["stages.1.blocks.2.attn.dwc.weight"], state["stage2.2.attns.0.get_v.weight"])
    assert torch.equal(out["stages.1.blocks.2.attn.wa_bias"], state["stage2.2.attns.0.wa_bias"])
    assert torch.equal(out["stages.0.blocks.1.attn.qkv.weight"], state["stage1.1.qkv.weight"])
    assert torch.equal(out["stages.2.downsample.proj.weight"], state["merge2.conv.weight"])
    assert torch.equal(out["patch_embed.norm.bias"], state["stage1_conv_embed.2.bias"])
    flatten_state, out = converted("flatten_cswin_tiny_224", official_cswin, cswin)
    assert torch.equal(out["stages.0.blocks.0.attn.lepe.weight"], flatten_state["stage1.0.attns.0.get_v.weight"])
    assert torch.equal(out["stages.0.blocks.0.attn.dwc.weight"], flatten_state["stage1.0.attns.0.dwc.weight"])
    assert torch.equal(out["head.fc.bias"], flatten_state["head.bias"])


def test_official_file_loads_through_timm(tmp_path):
    official = tensors(official_pvt("flatten_pvt_tiny"), device="cpu")
    path = tmp_path / "flatten_pvt_t.pth"
    torch.save({"model": official, "epoch": 300}, path)
    model = timm.create_model("flatten_pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    encoding = model.stages[0].blocks[1].attn.positional_encoding
    assert torch.equal(encoding, official["block1.1.attn.positional_encoding"])
    tuned = timm.create_model("flatten_pvt_tiny", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert tuned.get_classifier().out_features == 10
    assert torch.equal(tuned.stages[3].blocks[0].mlp.fc1.weight, official["block4.0.mlp.fc1.weight"])
    with_config = {"model": official, "config": object()}       # official training checkpoints pickle their config
    direct = timm.create_model("flatten_pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(state_dict=with_config))
    assert torch.equal(direct.stages[2].downsample.proj.weight, official["patch_embed3.proj.weight"])
    again = tmp_path / "ours.pth"
    torch.save(model.state_dict(), again)
    same = timm.create_model("flatten_pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(again)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys():
    state = tensors(official_pvt("agent_pvt_tiny"))
    del state["block3.1.attn.an_bias"]
    state["block3.1.attn.extra"] = torch.empty(3, device="meta")
    with torch.device("meta"):
        model = timm.create_model("agent_pvt_tiny")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['stages.2.blocks.1.attn.an_bias'\]"
                                         r"(.|\n)*unexpected keys \(1\): \['stages.2.blocks.1.attn.extra'\]"):
        pvt.checkpoint_filter_fn(state, model)
    with torch.device("meta"):
        swin_model = timm.create_model("agent_swin_tiny_patch4_window7_224")
    with pytest.raises(ValueError, match="missing keys"):                 # a PVT checkpoint into a Swin model
        swin.checkpoint_filter_fn(tensors(official_pvt("agent_pvt_tiny")), swin_model)
