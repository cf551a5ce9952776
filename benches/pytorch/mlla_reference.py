#!/usr/bin/env python3
"""A PyTorch port of MLLA (MILA), written from docs/MILA.md, with the official state_dict names.

The modules follow the specification of `/work/shared/docs/MILA.md` (sections 2-4): ELU+1 linear attention with
a 2-D rotary embedding (RoPE) and LePE, the MILA block (official `MLLABlock`), the convolutional stem,
PatchMerging and the MLLA classifier. Parameter and buffer names are the official `state_dict` names, so the
parity fixtures' `param.*` tensors (and official checkpoints, through `load_official`) load unchanged.

RoPE's cos/sin table is a non-persistent buffer computed in float64 from the grid (the fixtures leave the
official `rope.rotations` buffer out; it is derived from the shape), and converted with the module
(`model.to(dtype=...)`, `model.double()`). The rotation is done in real arithmetic (pairs (2p, 2p+1) as
(re, im)), which is what the official complex multiply computes, and stays traceable by torch.compile.

Entry points:

    python3 mlla_reference.py check [--fixtures DIR]    # the three MILA fixtures in float64, 1e-9 relative
    python3 mlla_reference.py params                    # parameter counts of the configs used by the benches

This file is imported by train_mnist.py and bench_models.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_BASE = 10000.0
Z_EPS = 1e-6

# ---- layers -----------------------------------------------------------------------------------------------


class RoPE2D(nn.Module):
    """Rotary embedding over an H x W grid for C channels: C/2 complex pairs (channels 2p, 2p+1 = re, im);
    with k_max = C/4 and theta_m = base^(-m / k_max), pair p < k_max turns by row * theta_p and pair
    p >= k_max by column * theta_(p - k_max). Input and output are tokens (..., H W, C) in row-major order."""

    def __init__(self, resolution: tuple[int, int], dim: int, base: float = ROPE_BASE):
        super().__init__()
        h, w = resolution
        if dim % 4 != 0:
            raise ValueError(f"RoPE-2D needs dim divisible by 4, got {dim}")
        k_max = dim // 4
        theta = base ** (-torch.arange(k_max, dtype=torch.float64) / k_max)
        rows = torch.arange(h, dtype=torch.float64)[:, None, None] * theta  # (h, 1, k)
        cols = torch.arange(w, dtype=torch.float64)[None, :, None] * theta  # (1, w, k)
        angles = torch.cat([rows.expand(h, w, k_max), cols.expand(h, w, k_max)], dim=-1).reshape(h * w, 2 * k_max)
        self.register_buffer("cos", torch.cos(angles), persistent=False)
        self.register_buffer("sin", torch.sin(angles), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        pairs = x.unflatten(-1, (-1, 2))
        re, im = pairs[..., 0], pairs[..., 1]
        return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


class LinearAttention(nn.Module):
    """MILA's linear attention (official `LinearAttention`): qk Linear(C, 2C), v = x, ELU+1 kernels, RoPE on
    q and k for the product, the normaliser from q and k without RoPE, and LePE (depthwise 3x3 conv of v)."""

    def __init__(self, dim: int, input_resolution, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"{num_heads} heads do not divide dim {dim}")
        self.dim, self.num_heads = dim, num_heads
        self.resolution = tuple(input_resolution)
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.rope = RoPE2D(self.resolution, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, w = self.resolution
        heads, d = self.num_heads, c // self.num_heads
        q, k = self.qk(x).chunk(2, dim=-1)
        q = F.elu(q) + 1.0
        k = F.elu(k) + 1.0
        q_rope, k_rope = self.rope(q), self.rope(k)

        def split(t):  # (B, N, C) -> (B, heads, N, d)
            return t.reshape(b, n, heads, d).transpose(1, 2)

        q, k, v, q_rope, k_rope = split(q), split(k), split(x), split(q_rope), split(k_rope)
        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + Z_EPS)  # (B, heads, N, 1)
        scale = n**-0.5
        kv = (k_rope.transpose(-2, -1) * scale) @ (v * scale)  # (B, heads, d, d)
        out = ((q_rope @ kv) * z).transpose(1, 2).reshape(b, n, c)
        image = x.transpose(1, 2).reshape(b, c, h, w)
        return out + self.lepe(image).flatten(2).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth per sample: zero a sample's residual branch with probability p, scale the rest by
    1 / (1 - p). The identity in eval mode or with p = 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _tokens_to_image(x, h, w):
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, h, w)


def _image_to_tokens(x):
    return x.flatten(2).transpose(1, 2)


class MLLABlock(nn.Module):
    """The MILA block (official `MLLABlock`), MILA.md section 3."""

    def __init__(self, dim, input_resolution, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.dim = dim
        self.resolution = tuple(input_resolution)
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn = LinearAttention(dim, input_resolution, num_heads, qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        h, w = self.resolution
        x = x + _image_to_tokens(self.cpe1(_tokens_to_image(x, h, w)))
        shortcut = x
        t = self.norm1(x)
        gate = F.silu(self.act_proj(t))
        t = _image_to_tokens(F.silu(self.dwc(_tokens_to_image(self.in_proj(t), h, w))))
        t = self.attn(t)
        x = shortcut + self.drop_path(self.out_proj(t * gate))
        x = x + _image_to_tokens(self.cpe2(_tokens_to_image(x, h, w)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvLayer(nn.Module):
    """Conv2d, optional BatchNorm2d (`norm`), optional ReLU (official `ConvLayer`)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, bias=True, norm=True, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout) if norm else None
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


class Stem(nn.Module):
    """`patch_embed`: to 1/4 resolution with C channels; every conv without bias, each with BatchNorm."""

    def __init__(self, in_chans, embed_dim):
        super().__init__()
        half = embed_dim // 2
        self.conv1 = ConvLayer(in_chans, half, 3, stride=2, bias=False)
        self.conv2 = nn.Sequential(
            ConvLayer(half, half, 3, bias=False), ConvLayer(half, half, 3, bias=False, relu=False)
        )
        self.conv3 = nn.Sequential(
            ConvLayer(half, 4 * embed_dim, 3, stride=2, bias=False),
            ConvLayer(4 * embed_dim, embed_dim, 1, bias=False, relu=False),
        )

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x) + x
        return _image_to_tokens(self.conv3(x))


class PatchMerging(nn.Module):
    """`downsample`: 1x1 C -> 8C (ReLU), 3x3 stride-2 depthwise 8C (ReLU), 1x1 8C -> 2C + BatchNorm."""

    def __init__(self, input_resolution, dim):
        super().__init__()
        self.resolution = tuple(input_resolution)
        out, wide = 2 * dim, 8 * dim
        self.conv = nn.Sequential(
            ConvLayer(dim, wide, 1, norm=False),
            ConvLayer(wide, wide, 3, stride=2, groups=wide, norm=False),
            ConvLayer(wide, out, 1, relu=False),
        )

    def forward(self, x):
        h, w = self.resolution
        return _image_to_tokens(self.conv(_tokens_to_image(x, h, w)))


class BasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, mlp_ratio, qkv_bias, drop_paths, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            MLLABlock(dim, resolution, num_heads, mlp_ratio, qkv_bias, drop_paths[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


@dataclass
class MllaConfig:
    """The constructor arguments (the same fields as the Rust `MllaConfig` and the fixtures' `config`)."""

    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 64
    depths: list = field(default_factory=lambda: [2, 4, 8, 4])
    num_heads: list = field(default_factory=lambda: [2, 4, 8, 16])
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    qkv_bias: bool = True

    @staticmethod
    def tiny():
        """MLLA-T (MllaConfig::tiny): 24,392,200 parameters at 224x224 with 1000 classes."""
        return MllaConfig()

    @staticmethod
    def mnist():
        """MllaConfig::mnist: 32x32x1, embed 16, depths 1,1,1,1, heads 1,2,4,8, 10 classes, no drop path."""
        return MllaConfig(32, 1, 10, 16, [1, 1, 1, 1], [1, 2, 4, 8], 4.0, 0.0, True)

    @staticmethod
    def small32():
        """The small MLLA of the benches: 32x32x1, embed 32, depths 1,2,2,1, heads 1,2,4,8, 10 classes."""
        return MllaConfig(32, 1, 10, 32, [1, 2, 2, 1], [1, 2, 4, 8], 4.0, 0.0, True)

    @staticmethod
    def from_dict(d: dict):
        names = MllaConfig.__dataclass_fields__.keys()
        return MllaConfig(**{k: v for k, v in d.items() if k in names})


class MLLA(nn.Module):
    """The MLLA classifier (MILA.md section 4)."""

    def __init__(self, cfg: MllaConfig):
        super().__init__()
        self.cfg = cfg
        stages = len(cfg.depths)
        self.patch_embed = Stem(cfg.in_chans, cfg.embed_dim)
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        side, first = cfg.img_size // 4, 0
        self.layers = nn.ModuleList()
        for i in range(stages):
            dim = cfg.embed_dim * 2**i
            last = i + 1 == stages
            self.layers.append(
                BasicLayer(
                    dim,
                    (side, side),
                    cfg.depths[i],
                    cfg.num_heads[i],
                    cfg.mlp_ratio,
                    cfg.qkv_bias,
                    rates[first : first + cfg.depths[i]],
                    downsample=not last,
                )
            )
            first += cfg.depths[i]
            if not last:
                side //= 2
        features = cfg.embed_dim * 2 ** (stages - 1)
        self.norm = nn.LayerNorm(features, eps=1e-5)
        self.head = nn.Linear(features, cfg.num_classes)
        self.apply(_init_weights)

    def forward_features(self, x):
        t = self.patch_embed(x)
        for layer in self.layers:
            t = layer(t)
        return self.norm(t).mean(dim=1)

    def forward(self, x):
        return self.head(self.forward_features(x))


def _init_weights(m: nn.Module):
    """Linear: truncated normal std 0.02 cut at +-2 (absolute), bias 0; LayerNorm: 1, 0; convs: PyTorch's
    default (left as constructed)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_linear_layers(module: nn.Module):
    """MLLA's init applied to a module built on its own (a block or an attention layer)."""
    module.apply(_init_weights)
    return module


def load_official(model: nn.Module, state_dict: dict, strict: bool = True):
    """Loads an official checkpoint's state_dict: its `rope.rotations` buffers are derived from the shape and
    dropped here (this port keeps its table as non-persistent buffers)."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("rope.rotations")}
    return model.load_state_dict(sd, strict=strict)


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups as mila-rs makes them: weight decay on weights of rank >= 2, none on biases, norms and
    every 1-D parameter."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (keep if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the fixture check ------------------------------------------------------------------------------------

TOLERANCE = 1e-9
# Below this fraction of the largest gradient of its parent module, a reference gradient is "vanishing" (zero
# in exact arithmetic; see mila/src/parity.rs): its error is measured against that largest gradient.
VANISHING = 1e-6


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} vs reference {tuple(want.shape)}")
    diff = (got.double() - want.double()).norm().item()
    ref = want.double().norm().item()
    return diff / ref if ref > 0 else diff


def _vanishing_scale(data: dict, key: str):
    """For a parameter gradient that vanishes next to its parent module's largest, that largest key."""
    if not key.startswith("grad.") or key == "grad.input":
        return None
    parts = key[len("grad.") :].split(".")
    parent = "grad." + ".".join(parts[:-2]) + ("." if len(parts) > 2 else "")
    best = None
    for k, t in data.items():
        if k.startswith(parent) and k != "grad.input":
            n = t.double().norm().item()
            if best is None or n > best[0]:
                best = (n, k)
    own = data[key].double().norm().item()
    if best is not None and own < VANISHING * best[0]:
        return best[1]
    return None


def _load_fixture(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        data = {k: f.get_tensor(k) for k in f.keys()}
    return meta.get("kind"), json.loads(meta.get("config", "{}")), data


def _build(kind: str, config: dict) -> nn.Module:
    if kind == "LinearAttention":
        return LinearAttention(config["dim"], config["input_resolution"], config["num_heads"], config.get("qkv_bias", True))
    if kind == "MLLABlock":
        return MLLABlock(
            config["dim"],
            config["input_resolution"],
            config["num_heads"],
            config.get("mlp_ratio", 4.0),
            config.get("qkv_bias", True),
            config.get("drop_path", 0.0),
        )
    if kind == "MLLA":
        return MLLA(MllaConfig.from_dict(config))
    raise ValueError(f"unsupported fixture kind {kind!r}")


def check_fixture(path: str):
    """Runs one fixture in float64 on the CPU; returns (kind, [(key, error, plain error, relative_to)])."""
    kind, config, data = _load_fixture(path)
    model = _build(kind, config).double()
    params = {k[len("param.") :]: v for k, v in data.items() if k.startswith("param.")}
    model.load_state_dict(params, strict=True)  # every parameter and buffer, nothing left over
    x = data["input"].clone()
    results = []

    def compare(key, got):
        scale_key = _vanishing_scale(data, key)
        plain = _rel(got, data[key])
        err = plain
        if scale_key is not None:
            err = (got.double() - data[key]).norm().item() / data[scale_key].double().norm().item()
        results.append((key, err, plain, scale_key or key))

    if "eval_output" in data:
        model.eval()
        with torch.no_grad():
            compare("eval_output", model(x))
    model.train()
    x.requires_grad_(True)
    out = model(x)
    compare("output", out.detach())
    out.backward(data["cotangent"])
    compare("grad.input", x.grad)
    named = dict(model.named_parameters())
    grads = sorted(k for k in data if k.startswith("grad.") and k != "grad.input")
    missing = sorted(set(named) - {k[len("grad.") :] for k in grads})
    if missing:
        raise AssertionError(f"{path}: no reference gradient for {missing}")
    for key in grads:
        p = named[key[len("grad.") :]]
        compare(key, p.grad if p.grad is not None else torch.zeros_like(p))
    state = model.state_dict()
    for key in sorted(k for k in data if k.startswith("buffer_after.")):
        compare(key, state[key[len("buffer_after.") :]])
    return kind, results


def check(fixture_dir: str, verbose: bool) -> bool:
    ok = True
    for name in ["linear_attention", "mila_block", "mlla_model"]:
        path = os.path.join(fixture_dir, f"{name}.safetensors")
        kind, results = check_fixture(path)
        worst = max(results, key=lambda r: r[1])
        for key, err, plain, rel_to in results:
            bad = not (err <= TOLERANCE)
            if verbose or bad:
                note = f"  (vanishing: relative to {rel_to}; plain {plain:.3e})" if rel_to != key else ""
                print(f"  {key:<60} {err:10.3e}  {'FAIL' if bad else 'ok'}{note}")
        passed = all(r[1] <= TOLERANCE for r in results)
        vanishing = [r for r in results if r[3] != r[0]]
        print(
            f"{name}.safetensors ({kind}): {len(results)} tensors, worst {worst[1]:.3e} ({worst[0]}), "
            f"tolerance {TOLERANCE:.0e}: {'ok' if passed else 'FAIL'}"
            + (f"; {len(vanishing)} vanishing gradient(s) measured against their module's largest" if vanishing else "")
        )
        ok &= passed
    return ok


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    default_fixtures = os.path.normpath(os.path.join(here, "..", "..", "fixtures"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="the three MILA fixtures in float64 (1e-9 relative)")
    c.add_argument("--fixtures", default=default_fixtures)
    c.add_argument("-v", "--verbose", action="store_true", help="print every tensor's error")
    sub.add_parser("params", help="parameter counts of the configs used by the benches")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.cmd == "check":
        ok = check(args.fixtures, args.verbose)
        print("check: " + ("all fixtures within 1e-9" if ok else "FAILED"))
        return 0 if ok else 1
    for name, cfg in [("tiny", MllaConfig.tiny()), ("mnist", MllaConfig.mnist()), ("small32", MllaConfig.small32())]:
        print(f"{name}: {num_params(MLLA(cfg)):,} parameters  {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
