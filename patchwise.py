#!/usr/bin/env python3
"""patchwise: PW-Self, patch-wise self-supervised visual representation learning, in one file.

PW-Self (Javidani, Sadeghi, Araabi, arXiv 2310.18651) is DINO plus a patch level: every patch of a
view is colour-augmented on its own, the patches of two views that show the same part of the image
are found from the crop geometry alone, and the teacher's output for a patch becomes the target of
the student's output for the matching patch. Read top to bottom: the recipe, then the method in
the order it runs (model, augmentation, matching, loss, the training step), then data, evaluation,
weights, the run, and the command line with main; each piece takes tensors and plain values, so it
copies alone into another project. Copy detection, retrieval, pictures, export: patchwise_tools.py.

    python patchwise.py                                   # CPU demo on a synthetic set, minutes
    torchrun --nproc_per_node=8 patchwise.py --data in1k --data_path /data/imagenet

What each gives, measured, and on which machine: README.md.
"""
import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image


# ---- The recipe ----------------------------------------------------------------------------------
# Each --data value selects a preset; any flag given on the command line overrides it. Flags not
# in a preset take DEFAULTS, which are DINO's (main_dino.py) unless a comment says otherwise.
DEFAULTS = dict(
    arch="vit_small", patch_size=16,  # DINO's ViT-S/16, whose ImageNet numbers are the reference
    depth=None, drop_path=0.1,  # None: the architecture's 12 blocks; DINO's drop path for ViT-S
    out_dim=8192,  # K; iBOT's for a head shared by CLS and patches (DINO's 65536 doubles the step)
    head_hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,  # DINO's head, norm frozen
    global_size=224, local_size=96, n_local=8,  # DINO's 2 global, 8 local views (100-epoch ViT-S)
    global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),  # DINO's RandomResizedCrop areas
    blur_sigma=(0.1, 2.0),  # DINO's blur radius (PIL's GaussianBlur, a sigma), for 224 px views
    batch_size=512,  # global, over all ranks; DINO's ViT-S/16 runs used 1024 on 16 GPUs
    epochs=100, lr=5e-4,  # DINO's shortest ViT-S schedule; lr per 256 images, scaled with the batch
    min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,  # DINO's cosines
    momentum_teacher=0.996, clip_grad=3.0,  # DINO's EMA (to 1 by a cosine), per-parameter clip
    freeze_last_layer=1,  # DINO: the head's last layer fixed for the first epoch
    teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,  # DINO's ViT-S
    num_workers=10, log_every=50,  # DINO's workers per GPU, capped at each process's cores
    knn_every=0, knn_k=(10, 20, 100, 200),  # k-NN at the end (minutes on ImageNet); DINO's ks
    linear_iters=1000,  # the probe's L-BFGS iterations at most (CLIP's cap); the sweep's a 20th
)
PRESETS = {
    # The CPU demo, about 5 minutes on 2 cores: the cost per image cut (4 blocks, a 4x4 grid of 8 px
    # patches, 4 locals, small head and K); its ~600 steps: a small batch, a faster teacher.
    "synthetic": dict(arch="vit_tiny", patch_size=8, depth=4, drop_path=0.0, out_dim=1024,
                      head_hidden_dim=512, bottleneck_dim=128, global_size=32, local_size=16,
                      n_local=4, batch_size=32, epochs=4, lr=4e-3, warmup_epochs=1,
                      momentum_teacher=0.99, freeze_last_layer=0, num_workers=0, log_every=40),
    # CIFAR-10 at its 32 px, patch 4: an 8x8 grid (the public PW-Self code upsamples to 224 px). No
    # blur: DINO's was set for 224 px views, SimCLR's CIFAR-10 recipe drops it, the demo gains 2.3.
    "cifar10": dict(patch_size=4, global_size=32, local_size=16, blur_sigma=(0.0, 0.0),
                    out_dim=4096, epochs=300, knn_every=20, num_workers=8),
    # ImageNet presets keep DINO's ViT-S/16 recipe, with K = 8192 (see out_dim).
    "in100": dict(epochs=300, knn_every=20), "in1k": dict(), "folder": dict(knn_every=10),
}
VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads
# The linear probe's L2 strengths (penalty l2 / 2 |W|^2 on standardised features), strongest first.
LINEAR_L2 = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# --data folder: a median side up to SMALL_SIDE px gets the demo's model for CPU_SAMPLES samples on
# a CPU (6 min on 2 cores; digits: 6-8 k-NN points over 20,000), 10x on a GPU; larger: ImageNet's.
SMALL_SIDE, CPU_SAMPLES = 64, 32_000


# ---- Model: ViT backbone and DINO head -----------------------------------------------------------
# Parameter names and shapes are those of DINO's vision_transformer.py and timm's ViT, so their
# checkpoints load here with strict=True and ours load there.

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, C/H)
        x = F.scaled_dot_product_attention(q, k, v)  # flash/memory-efficient kernel where available
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, H, N, C/H) -> (B, N, C)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        # stochastic depth: the whole residual branch dropped for some samples of the batch
        self.drop_path = torchvision.ops.StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(collections.OrderedDict(  # keys mlp.fc1, mlp.fc2 as in DINO
            fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed, grid):
    """Resize a (1, 1 + h*w, D) position embedding to a (gh, gw) patch grid, bicubic, CLS kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    side, dim = math.isqrt(patch_pos.shape[1]), patch_pos.shape[2]
    assert side * side == patch_pos.shape[1], "the position embedding is not of a square grid"
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    patch_pos = F.interpolate(patch_pos.float(), size=tuple(grid), mode="bicubic")
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, N, D)
    return torch.cat([cls_pos, patch_pos], dim=1)


def _init_weights(m):  # DINO's; LayerNorms keep their own init, ones and zeros
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """DINO's ViT. forward(x) returns all tokens after the final norm: (B, 1 + N, D), CLS first."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.patch_embed = nn.Sequential(collections.OrderedDict(  # key patch_embed.proj
            proj=nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)))
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks dropped more
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        grid = (H // self.patch_size, W // self.patch_size)
        pos, side = self.pos_embed, math.isqrt(self.pos_embed.shape[1] - 1)
        if grid != (side, side):  # the table is square: a 7x28 grid of 196 patches needs it too
            pos = interpolate_pos_embed(pos, grid)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        return x + pos

    def forward(self, x):
        return self.get_intermediate_layers(x)[0]  # (B, 1 + N, D)

    def get_intermediate_layers(self, x, n=1):
        """The last n blocks' outputs after the final norm, n x (B, 1 + N, D): DINO's probe's."""
        x, outputs = self.prepare_tokens(x), []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs


def vit(arch, patch_size=16, drop_path_rate=0.0, depth=12, img_size=224):
    dim, heads = VIT_SIZES[arch]
    return VisionTransformer(img_size, patch_size, dim, depth, heads, drop_path_rate=drop_path_rate)


class WeightNormLinear(nn.Module):
    """weight = g v / ||v|| per output row, no bias; named as torch's weight_norm, as in DINO."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer to K outputs."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),  # DINO's 3 layers:
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),  # keys mlp.0, .2, .4
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Encoder(nn.Module):
    """DINO's MultiCropWrapper: per resolution, the tokens (B_r, 1 + N_r, D) and the head's outputs
    (B_r, T_r, K), one head call for all, T_r = 1 + N_r, or 1 with patches=False (plain DINO)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops, patches=True):
        tokens = [self.backbone(x) for x in crops]  # each (B_r, 1 + N_r, D)
        used = tokens if patches else [t[:, :1] for t in tokens]  # each (B_r, T_r, D)
        out = self.head(torch.cat([t.flatten(0, 1) for t in used]))  # (sum B_r T_r, K)
        out = out.split([t.shape[0] * t.shape[1] for t in used])
        return tokens, [o.view(*t.shape[:2], -1) for o, t in zip(out, used)]


def build_encoder(arch, patch_size, out_dim, drop_path=0.0, depth=None, img_size=224,
                  head_hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
    backbone = vit(arch, patch_size, drop_path, depth or 12, img_size)
    head = DINOHead(backbone.embed_dim, out_dim, head_hidden_dim, bottleneck_dim,
                    norm_last_layer=norm_last_layer)
    return Encoder(backbone, head)


# ---- Augmentation: spatial views with their geometry (workers), photometric (device, batched) ----
# Every random number below comes from a generator the caller passes in, seeded by (seed, epoch,
# sample index) in training: a sample's views are the same on any worker, rank, world, resume.

def sample_crop_box(rng, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, DINO's crop law: integer boxes, 10 tries, then
    the largest centred box of an allowed ratio. Returns (top, left, height, width) in px."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    w, h = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))
    return (height - h) // 2, (width - w) // 2, h, w


def spatial_views(img, rng, global_size, local_size, n_local, global_scale=(0.4, 1.0),
                  local_scale=(0.05, 0.4)):
    """2 global and n_local local random resized crops of img uint8 (3, H, W), flipped with p=0.5:
    uint8 (2, 3, Sg, Sg), (n_local, 3, Sl, Sl), and all the matching needs: box (V, 4) (top, left,
    h, w) px, flip (V,)."""
    _, height, width = img.shape
    views, boxes, flips = [], [], []
    for v in range(2 + n_local):
        size, scale = (global_size, global_scale) if v < 2 else (local_size, local_scale)
        top, left, h, w = sample_crop_box(rng, height, width, scale)
        flip = bool(rng.random() < 0.5)
        # PIL's antialiased bicubic (a = -0.5) in torch's uint8 kernel, some 5x faster than PIL's
        view = F.interpolate(img[None, :, top:top + h, left:left + w], (size, size),
                             mode="bicubic", antialias=True)[0]  # (3, S, S)
        views.append(view.flip(-1) if flip else view)
        boxes.append((top, left, h, w))
        flips.append(flip)
    local = (torch.stack(views[2:]) if n_local else
             torch.zeros(0, 3, local_size, local_size, dtype=torch.uint8))  # --n_local 0
    return torch.stack(views[:2]), local, torch.tensor(boxes).float(), torch.tensor(flips)


# DINO's per-view probabilities: blur always on global view 1, rarely on global view 2, half the
# time on the locals; solarization on global view 2 only.
P_BLUR_GLOBAL, P_SOLARIZE_GLOBAL = (1.0, 0.1), (0.0, 0.2)
P_BLUR_LOCAL, P_SOLARIZE_LOCAL = 0.5, 0.0


def draw_photometric_params(rng, n_views, n_tiles, p_blur, p_solarize, p_jitter=0.8, p_gray=0.2,
                            jitter=(0.4, 0.4, 0.2, 0.1), blur_sigma=(0.1, 2.0)):
    """DINO's colour augmentation drawn for n_views views of n_tiles tiles (patches; 1 for DINO):
    tile_params (V, T, 6): jitter on, bright, contrast, sat, hue, gray; view_params (V, 2): blur
    sigma, solarize. p_blur, p_solarize: one probability, or one per view."""
    b, c, s, h = jitter
    u = rng.random((n_views, n_tiles, 6), dtype=np.float32)
    tile_params = np.stack([u[..., 0] < p_jitter, 1 - b + 2 * b * u[..., 1],
                            1 - c + 2 * c * u[..., 2], 1 - s + 2 * s * u[..., 3],
                            -h + 2 * h * u[..., 4], u[..., 5] < p_gray], axis=-1).astype(np.float32)
    u = rng.random((n_views, 3), dtype=np.float32)
    sigma = np.where(u[:, 0] < np.asarray(p_blur),
                     blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[:, 1], 0.0)
    view_params = np.stack([sigma, u[:, 2] < np.asarray(p_solarize)], axis=-1).astype(np.float32)
    return torch.from_numpy(tile_params), torch.from_numpy(view_params)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def constant(values, device):
    """A constant float tensor filled in on `device`: one copied from the host would wait for it."""
    return torch.stack([torch.full((), v, device=device) for v in values])


def grayscale(x):
    """ITU-R 601 luma of (B, 3, ...) -> (B, 1, ...), as torchvision's rgb_to_grayscale."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def adjust_hue(x, shift):
    """Rotate the hue of (B, 3, ...) RGB in [0, 1] by `shift` turns, (B, 1, ...)-broadcastable."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))  # grey pixels have no hue
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = (h / 6 + shift.squeeze(1)) % 1.0  # (B, ...), in turns
    # HSV -> RGB in closed form: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k =
    # (n + 6 h) mod 6, v s = max - min
    n = constant((5.0, 3.0, 1.0), x.device).view(1, 3, *([1] * (x.dim() - 2)))
    k = (n + 6 * h.unsqueeze(1)) % 6  # (B, 3, ...)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter_tiles(x, tile_params):
    """Colour jitter then grayscale of x float (B, 3, S, S) in [0, 1], each tile with its own
    tile_params (B, g*g, 6), row-major; one fixed order of ops: the draws carry the randomness."""
    B, _, S, _ = x.shape
    g = math.isqrt(tile_params.shape[1])
    assert g * g == tile_params.shape[1] and S % g == 0, f"{g * g} tiles do not tile a {S}x{S} view"
    x = x.reshape(B, 3, g, S // g, g, S // g)  # (B, 3, g, q, g, q): tile (i, j) is x[..., i, :, j]
    params = tile_params.reshape(B, 1, g, 1, g, 1, 6)  # broadcasts over channels and pixels
    on, bright, contrast, sat, hue, gray = params.unbind(-1)
    y = (x * bright).clamp(0, 1)
    mean = grayscale(y).mean(dim=(3, 5), keepdim=True)  # contrast pivots on the tile's own grey
    y = (contrast * y + (1 - contrast) * mean).clamp(0, 1)
    y = (sat * y + (1 - sat) * grayscale(y)).clamp(0, 1)
    y = adjust_hue(y, hue)
    x = torch.where(on > 0, y, x)
    x = torch.where(gray > 0, grayscale(x).expand_as(x), x)
    return x.reshape(B, 3, S, S)


def gaussian_blur(x, sigma, radius=6):
    """Each image of (B, C, H, W) blurred with its sigma (B,), 0 for none: separable, batched."""
    B, C, H, W = x.shape
    radius = min(radius, H - 1, W - 1)  # reflect padding needs it; 6 covers 3 sigma at sigma 2
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (k / sigma.clamp_min(1e-3).unsqueeze(1)) ** 2)  # (B, 2r+1); 0: a delta
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B C, 2r+1)
    y = F.pad(x.reshape(1, B * C, H, W), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, w[:, None, :, None], groups=B * C)  # vertical pass
    y = F.conv2d(y, w[:, None, None, :], groups=B * C)  # horizontal pass
    return y.reshape(B, C, H, W)


def imagenet_normalize(x):
    mean = constant(IMAGENET_MEAN, x.device).view(1, 3, 1, 1)
    std = constant(IMAGENET_STD, x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def photometric_augment(views, tile_params, view_params):
    """The drawn photometric augmentation of uint8 views (B, 3, S, S) on their device, with
    tile_params (B, G, 6) and view_params (B, 2) as drawn. Returns float32 (B, 3, S, S)."""
    x = gaussian_blur(color_jitter_tiles(views.float() / 255, tile_params), view_params[:, 0])
    solarize = (view_params[:, 1] > 0).view(-1, 1, 1, 1)
    x = torch.where(solarize & (x >= 128 / 255), 1 - x, x)  # PIL's threshold 128
    return imagenet_normalize(x)


# ---- Patch matching ------------------------------------------------------------------------------

def match_patches(t_box, t_flip, t_size, s_box, s_flip, s_size, patch_size, rule="coords"):
    """For every student patch, the teacher patch showing the same image part, from the crop
    geometry alone, axis by axis, O(N_s). Boxes (B, 4) (top, left, h, w) in image px, flips (B,),
    sizes: view sides. coords (ours): the patch centre through the student box to image pixels,
    into the teacher view, the teacher patch holding it (many-to-one). intersection (the public
    PW-Self code's): in each view the run of patches over the crops' intersection (round(P offset /
    side) on, round(P overlap / side) long, mirrored if flipped), the longer run subsampled to the
    shorter at floor(linspace(0, n_long - 1, n_short)) exactly (one-to-one). Returns index (B, N_s)
    into the teacher's patch tokens (row-major, no CLS), valid (B, N_s): matched."""
    B, gs, gt = s_box.shape[0], s_size // patch_size, t_size // patch_size
    k = torch.arange(gs, device=s_box.device)  # (gs,) the student's patches along an axis

    def axis(a):  # a = 0: rows (top, h), 1: columns (left, w) -> teacher line, valid, (B, gs) each
        s0, sl, t0, tl = (box[:, a + o].view(B, 1) for box in (s_box, t_box) for o in (0, 2))
        sf, tf = (f.view(B, 1) & (a == 1) for f in (s_flip, t_flip))  # flips mirror columns only
        if rule == "coords":
            u = (k + 0.5) * patch_size  # the patch centres in student-view px, then un-flipped
            u = torch.where(sf, s_size - u, u)
            ut = (s0 + u * sl / s_size - t0) * t_size / tl  # image px, then teacher-view px
            valid = (ut >= 0) & (ut < t_size)
            ut = torch.where(tf, t_size - ut, ut)
            return torch.div(ut, patch_size, rounding_mode="floor").long().clamp(0, gt - 1), valid
        lo = torch.maximum(s0, t0)
        overlap = torch.minimum(s0 + sl, t0 + tl) - lo  # (B, 1); <= 0: the crops do not meet
        s_at = torch.round(gs * ((lo - s0) / sl)).long()  # each view's first patch over the overlap
        t_at = torch.round(gt * ((lo - t0) / tl)).long()
        s_n = torch.minimum(torch.round(gs * (overlap / sl)).long(), gs - s_at)  # and their count
        t_n = torch.minimum(torch.round(gt * (overlap / tl)).long(), gt - t_at)
        n = torch.minimum(s_n, t_n).clamp(min=0)  # (B, 1) pairs; pair k takes, in each run, patch
        sp = s_at + k * (s_n - 1).clamp(min=0) // (n - 1).clamp(min=1)  # k (the shorter run) or
        tp = t_at + k * (t_n - 1).clamp(min=0) // (n - 1).clamp(min=1)  # floor(k (n_long-1)/(n-1))
        sp, tp = torch.where(sf, gs - 1 - sp, sp), torch.where(tf, gt - 1 - tp, tp)  # (B, gs)
        sp = torch.where(k < n, sp, gs)  # the pairs beyond n go to a spare column, dropped
        line = torch.zeros(B, gs + 1, dtype=torch.long, device=k.device).scatter_(1, sp, tp)
        return line[:, :gs], torch.zeros_like(line, dtype=torch.bool).scatter_(1, sp, k < n)[:, :gs]
    (row, row_ok), (col, col_ok) = axis(0), axis(1)
    index = row.view(B, gs, 1) * gt + col.view(B, 1, gs)  # (B, gs, gs)
    return index.flatten(1), (row_ok.view(B, gs, 1) & col_ok.view(B, 1, gs)).flatten(1)


def match_views(box, flip, sizes, patch_size, n_global=2, t_feats=None, s_feats=None,
                rule="coords"):
    """{(i, v): (index, valid) (B, N_v)} for every (teacher global i, student view v != i) pair, a
    student resolution in one call. box (B, V, 4), flip (B, V), sizes (V,), globals first, matched
    by match_patches' rule; or, given t_feats G x (B, N_t, D) and s_feats V x (B, N_v, D), each
    student patch to the teacher patch of highest cosine similarity (the EsViT/GTSA ablation)."""
    V, matches = len(sizes), {}

    def pair_major(x, views):  # (B, V, ...) -> (P B, ...): the views' images, pair after pair
        return torch.cat([x[:, v] for v in views])  # integer indices: a list would be copied in
    for students in (range(n_global), range(n_global, V)):  # one student resolution at a time
        pairs = [(i, v) for i in range(n_global) for v in students if v != i]
        if not pairs:
            continue
        t, s = [i for i, _ in pairs], [v for _, v in pairs]
        if t_feats is None:
            index, valid = match_patches(pair_major(box, t), pair_major(flip, t), sizes[0],
                                         pair_major(box, s), pair_major(flip, s), sizes[s[0]],
                                         patch_size, rule)  # (P B, N_s) each
        else:  # O(N_s N_t D)
            t_f = F.normalize(torch.cat([t_feats[i] for i in t]).float(), dim=-1)  # (P B, N_t, D)
            s_f = F.normalize(torch.cat([s_feats[v] for v in s]).float(), dim=-1)  # (P B, N_s, D)
            index = (s_f @ t_f.transpose(1, 2)).argmax(dim=-1)  # (P B, N_s)
            valid = torch.ones_like(index, dtype=torch.bool)
        matches.update(zip(pairs, zip(index.chunk(len(pairs)), valid.chunk(len(pairs)))))
    return matches


# ---- Loss: image-level and patch-level self-distillation -----------------------------------------
# Processes (torchrun): the loss all-reduces its statistics; later sections use these two too.
def _distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce(x, op="sum"):
    """x summed (op "min": its minimum) over all ranks, in place; in one process x as it is."""
    if _distributed():
        dist.all_reduce(x, dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return x


class PWSelfLoss(nn.Module):
    """DINO's DINOLoss with a patch level, over (teacher global i, student view v != i) pairs:
    cross-entropy from the centred, sharpened teacher CLS to the student's (image loss), and from
    matched teacher patches to student patches, over valid matches (patch loss); a centre each."""

    def __init__(self, out_dim, warmup_teacher_temp=0.04, teacher_temp=0.04,
                 warmup_teacher_temp_epochs=0, student_temp=0.1, center_momentum=0.9,
                 patch_loss_weight=1.0, loss_weighting="sum"):
        super().__init__()
        assert loss_weighting in ("sum", "token_mean"), loss_weighting
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.patch_loss_weight, self.loss_weighting = patch_loss_weight, loss_weighting
        self.register_buffer("center_cls", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, out_dim))
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)

    def teacher_temp(self, epoch):
        """DINO's: linear over the warm-up epochs, sharp targets while the student is random."""
        start, end, n = self.temps
        return end if epoch >= n else start + (end - start) * epoch / max(n - 1, 1)

    def forward(self, student_out, teacher_out, matches, epoch, measure_entropy=True):
        """student_out: per student view (globals first) the head's outputs (B, 1 + N_v, K), CLS
        first, or the CLS's (B, 1, K) for plain DINO; teacher_out: the same, global views;
        matches[i, v]: (index, valid) (B, N_v). Returns (total, image part, patch part).
        It all-reduces (the valid-match counts, the centres' batch means): every rank must call it.
        measure_entropy: leaves self.teacher_entropy (4,) nats, `entropies` of the CLS targets then
        of the patch targets: the mean entropy of a target, and the entropy of the batch's mean."""
        temp, w = self.teacher_temp(epoch), self.patch_loss_weight
        with torch.no_grad():  # sharper than the student, and centred: together they avoid collapse
            q_cls = [F.softmax((t[:, 0].float() - self.center_cls) / temp, dim=-1)
                     for t in teacher_out]  # each (B, K)
            q_patch = [F.softmax((t[:, 1:].float() - self.center_patch) / temp, dim=-1)
                       for t in teacher_out]  # each (B, N_t, K)
        logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        pairs = [(i, v) for i in range(len(teacher_out)) for v in range(len(student_out)) if v != i]
        B, K = logp[0].shape[0], logp[0].shape[-1]
        # Valid matches per pair over all ranks, / ranks as DDP averages gradients: the mean over
        # the global batch's matches however it is split; on the device: the host does not wait.
        n_patch = torch.zeros(len(pairs), device=logp[0].device)
        if w > 0:
            n_patch = all_reduce(torch.stack([matches[p][1].sum() for p in pairs]).float())
            n_patch = n_patch / (dist.get_world_size() if _distributed() else 1)
        loss_image = loss_patch = torch.zeros((), device=logp[0].device)
        for k, (i, v) in enumerate(pairs):
            image = -(q_cls[i] * logp[v][:, 0]).sum()  # summed over the B images
            patch = 0.0
            if w > 0:
                index, valid = matches[i, v]  # (B, N_v) each
                target = q_patch[i].gather(1, index.unsqueeze(-1).expand(-1, -1, K))  # (B, N_v, K)
                patch = ((-(target * logp[v][:, 1:]).sum(-1)) * valid).sum()  # invalid ones add 0
            if self.loss_weighting == "sum":  # each level a mean; a pair without matches adds 0
                loss_image = loss_image + image / B
                loss_patch = loss_patch + w * patch / n_patch[k].clamp_min(1)
            else:  # token_mean: the pair's CLS and patch terms averaged as one set of tokens
                loss_image = loss_image + image / (B + n_patch[k])
                loss_patch = loss_patch + w * patch / (B + n_patch[k])
        loss_image, loss_patch = loss_image / len(pairs), loss_patch / len(pairs)
        with torch.no_grad():
            if measure_entropy:
                self.teacher_entropy = torch.cat([entropies(q_cls), entropies(q_patch)])
            t_cls = torch.cat([t[:, 0] for t in teacher_out])  # (G B, K)
            self.update_center(t_cls, torch.cat([t[:, 1:] for t in teacher_out]).flatten(0, 1))
        return loss_image + loss_patch, loss_image, loss_patch

    @torch.no_grad()
    def update_center(self, cls, patch):
        """EMA of the batch mean of the teacher outputs over all ranks, CLS (M_c, K) and patch (M_p,
        K) outputs apart; as iBOT, the patch centre is over all the teacher's patch outputs, matched
        or not: it is the teacher's bias per dimension, which does not depend on the matching."""
        world = dist.get_world_size() if _distributed() else 1  # every rank has the same M_c, M_p
        K, m = cls.shape[1], self.center_momentum
        sums = all_reduce(torch.cat([cls.float().sum(0), patch.float().sum(0)]))  # (2 K,)
        self.center_cls.mul_(m).add_(sums[:K] / (len(cls) * world), alpha=1 - m)
        if len(patch):  # plain DINO's teacher has no patch outputs: its patch centre stays
            self.center_patch.mul_(m).add_(sums[K:] / (len(patch) * world), alpha=1 - m)


def entropies(qs, chunk=4096):
    """The mean entropy of the rows of qs, tensors (..., K) of target distributions, and the entropy
    of their mean, (2,) nats (0 for no rows). Healthy: the first low, the second high; uniform
    collapse: both near ln K; collapse on one dimension: both near 0."""
    rows = [c for q in qs for c in q.flatten(0, -2).split(chunk)]  # (<= chunk, K): ImageNet's: GBs
    n = max(sum(len(c) for c in rows), 1)
    mean = sum(c.sum(0) for c in rows) / n  # (K,)
    row = sum(torch.xlogy(c, c).sum() for c in rows)  # 0 log 0: 0
    return torch.stack([-row / n, -torch.xlogy(mean, mean).sum()])


# ---- The training step: augment, forward, match, loss, backward, EMA -----------------------------

def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, start_warmup=0.0):
    """Per-iteration values: linear warm-up from start_warmup to base, then cosine to final."""
    warmup = np.linspace(start_warmup, base, round(min(warmup_epochs, epochs) * iters_per_epoch))
    steps = np.arange(epochs * iters_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def param_groups(model):
    """Weight decay on weights only: DINO leaves biases and norm parameters (1-D) alone."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(parameters, clip):
    """DINO's clipping: each parameter's gradient norm capped at `clip` on its own (times min(1,
    clip / (norm + 1e-6))), in a few multi-tensor calls rather than a loop of small ones."""
    grads = [p.grad for p in parameters if p.grad is not None]
    divisors = torch._foreach_div(torch._foreach_add(torch._foreach_norm(grads), 1e-6), clip)
    torch._foreach_clamp_min_(divisors, 1.0)
    torch._foreach_div_(grads, divisors)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, over all parameters at once."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)


def unwrap(model):
    """The plain module inside the torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare_views(batch, device):
    """A collated batch's views on the device, colour-augmented there: global (G B, 3, Sg, Sg) and
    local (L B, 3, Sl, Sl) or None, view-major (all images' view 0, then view 1...) as DINO's."""
    def views(key, tile_key, params):
        if batch[key].shape[1] == 0:  # --n_local 0
            return None
        x = batch[key].to(device, non_blocking=True)  # (B, n, 3, S, S) uint8 -> (n B, 3, S, S)
        tile = batch[tile_key].to(device, non_blocking=True)  # (B, n, G, 6)
        return photometric_augment(*(t.transpose(0, 1).flatten(0, 1) for t in (x, tile, params)))
    params = batch["view_params"].to(device, non_blocking=True)  # (B, V, 2)
    G = batch["global_views"].shape[1]
    glob = views("global_views", "tile_global", params[:, :G])
    return glob, views("local_views", "tile_local", params[:, G:])


def train_step(student, teacher, loss_fn, optimizer, batch, *, epoch, lr, wd, momentum, patch_size,
               matching="coords", clip_grad=3.0, freeze_last_layer=False, amp_dtype=None,
               scaler=None, measure_entropy=True):
    """One PW-Self iteration: augment, forward, match patches, loss, backward, AdamW, EMA; amp_dtype
    float16 needs a torch.amp.GradScaler. Never waits for the device (no value read, no blocking
    copy): returns float32 (7,) there, the loss, its image and patch parts, teacher entropies (0
    unless measure_entropy)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # off: each call passes through
    device = next(teacher.parameters()).device
    patches = loss_fn.patch_loss_weight > 0  # plain DINO runs the head on CLS tokens only
    glob, local = prepare_views(batch, device)
    G, L = batch["global_views"].shape[1], batch["local_views"].shape[1]
    sizes = [glob.shape[-1]] * G + ([local.shape[-1]] * L if L else [])
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = wd  # group 0 holds the decayed weights
    # The teacher (global views only) in float16 under autocast, as DINO: its targets divide its
    # outputs by 0.04, and bfloat16's 8-bit mantissa puts them ~65x further (KL) from float32's.
    with torch.no_grad(), torch.autocast(device.type, torch.float16, enabled=amp_dtype is not None):
        t_tokens, (t_out,) = teacher([glob], patches)
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                        enabled=amp_dtype is not None):
        s_tokens, s_out = student([glob, local] if L else [glob], patches)
    teacher_out = t_out.chunk(G)  # G x (B, T_g, K)
    student_out = s_out[0].chunk(G) + (s_out[1].chunk(L) if L else ())  # V x (B, T_v, K)
    matches = {}
    if patches and matching != "similarity":  # geometry alone, a few tensor ops on the device
        matches = match_views(batch["box"].to(device, non_blocking=True),
                              batch["flip"].to(device, non_blocking=True), sizes, patch_size, G,
                              rule=matching)
    elif patches:  # the ablation: by similarity of the backbone's patch features
        s_feats = [f for t, n in zip(s_tokens, (G, L)) for f in t[:, 1:].detach().chunk(n)]
        matches = match_views(None, None, sizes, patch_size, G, t_tokens[0][:, 1:].chunk(G),
                              s_feats)  # s_feats: V x (B, N_v, D)
    loss, loss_image, loss_patch = loss_fn(student_out, teacher_out, matches, epoch,
                                           measure_entropy)

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # fp16: the loss scaled up for backward, the gradients back down
    scaler.unscale_(optimizer)  # before the clip
    if clip_grad:
        clip_gradients(student.parameters(), clip_grad)
    if freeze_last_layer:  # DINO: a fixed last layer in the first epoch keeps early training stable
        for p in unwrap(student).head.last_layer.parameters():
            p.grad = None
    scaler.step(optimizer)  # fp16: skipped if the gradients overflowed, and the scale lowered
    scaler.update()
    ema_update(teacher, unwrap(student), momentum)
    losses = torch.stack([loss, loss_image, loss_patch]).detach().float()
    return torch.cat([losses, loss_fn.teacher_entropy if measure_entropy else losses.new_zeros(4)])


# ---- Data ----------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "plus", "horizontal stripes",
                     "vertical stripes", "checkerboard", "diagonal stripes", "x")
# Foreground and background colours of the synthetic set: red, green, blue, yellow.
SYNTHETIC_PALETTE = np.array([[220, 50, 40], [40, 170, 70], [40, 80, 210], [235, 200, 40]], float)


def make_synthetic_shapes(n, size=32, seed=0):
    """A shape or texture of SYNTHETIC_CLASSES, one palette colour on another, noisy: uint8 (n, S,
    S, 3), labels (n,). A small palette: random colours would be learned instead of shapes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SYNTHETIC_CLASSES))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # (S, S) pixel centres
    shape = (n, 1, 1)
    cx, cy = (rng.uniform(0.3, 0.7, shape) * size for _ in range(2))
    r = rng.uniform(0.22, 0.38, shape) * size
    period = rng.uniform(5, 9, shape) * size / 32
    phase = rng.uniform(0, 2 * np.pi, shape)
    dx, dy = xx - cx, yy - cy  # (n, S, S)
    dist2 = dx ** 2 + dy ** 2
    box = np.maximum(np.abs(dx), np.abs(dy))
    arm = r / 3
    diag = np.where(rng.random(shape) < 0.5, xx + yy, xx - yy) / np.sqrt(2)  # either diagonal
    masks = np.stack([  # in the order of SYNTHETIC_CLASSES
        dist2 < r ** 2, box < 0.85 * r, (dy < 0.6 * r) & (dy > -r + 2 * np.abs(dx)),
        (dist2 < r ** 2) & (dist2 > (0.55 * r) ** 2),
        ((np.abs(dx) < arm) | (np.abs(dy) < arm)) & (box < r),
        np.sin(2 * np.pi * yy / period + phase) > 0, np.sin(2 * np.pi * xx / period + phase) > 0,
        ((np.floor((xx + phase) / period * 1.5) + np.floor((yy + phase) / period * 1.5)) % 2) > 0,
        np.sin(2 * np.pi * diag / period + phase) > 0,
        ((np.abs(dx - dy) < arm) | (np.abs(dx + dy) < arm)) & (box < r),
    ])  # (10, n, S, S)
    mask = masks[labels, np.arange(n)][..., None]  # (n, S, S, 1)
    # two distinct colours, (n, 2)
    pair = rng.permuted(np.tile(np.arange(len(SYNTHETIC_PALETTE)), (n, 1)), axis=1)[:, :2]
    fg, bg = SYNTHETIC_PALETTE[pair].reshape(n, 2, 1, 1, 3).transpose(1, 0, 2, 3, 4)
    images = np.where(mask, fg, bg) + rng.normal(0, 8, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


# ImageNet-100: CMC's 100 classes (Tian et al. 2019), as solo-learn and most papers use; no other.
IMAGENET100_CLASSES = tuple("""
    n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245
    n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148
    n03530642 n04435653 n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993
    n04493381 n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 n01820546
    n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838
    n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888 n04026417
    n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973
    n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032
    n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869
    n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
    n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672
    n02090622""".split())


def load_image(path):
    """Any image file as uint8 RGB (3, H, W): JPEG, PNG, GIF, WebP by torchvision's decoders into a
    tensor; the rest (BMP, TIFF, 16-bit, WebP before torchvision 0.20, a damaged file) by PIL, 16-
    and 32-bit images scaled where convert saturates; a file neither reads raises PIL's error."""
    with contextlib.suppress(RuntimeError, AttributeError):  # or the decoders, deprecated, gone
        x = torchvision.io.decode_image(torchvision.io.read_file(str(path)),
                                        torchvision.io.ImageReadMode.RGB)
        if x.dtype == torch.uint8 and x.dim() == 3:  # not 16 bits, not an animation's frames
            return x
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here and not mid-augmentation
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        a = a * (255 / 65535) if a.max() > 255 else a
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W)


def array_images(images, labels):
    """A dataset of (uint8 (3, H, W), label) from images (N, H, W, 3): CIFAR-10's, the synthetic."""
    return torch.utils.data.TensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2),
                                          torch.as_tensor(labels))


class ClassFolder(torchvision.datasets.ImageFolder):
    """ImageFolder of `classes` only (None: every sub-folder), labelled in sorted order; at module
    level, so that data workers started by spawn (macOS) or forkserver (Python 3.14) unpickle it."""

    def __init__(self, root, classes=None, allow_empty=False):
        self.only = classes  # find_classes runs inside ImageFolder's __init__
        super().__init__(root, loader=load_image, allow_empty=allow_empty)

    def find_classes(self, directory):
        if self.only is None:
            return super().find_classes(directory)
        return list(self.only), {c: i for i, c in enumerate(self.only)}


@contextlib.contextmanager
def one_at_a_time(folder):
    """The block run by one process at a time among all that share `folder` (a lock file in it)."""
    import fcntl  # Linux and macOS, where torchrun runs
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".download.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released as the file closes
        yield


def build_datasets(data, data_path, download=False, synthetic_size=(5000, 1000)):
    """The train and val sets for --data, each of (uint8 (3, H, W), label); the class count."""
    if data == "synthetic":
        train, val = (array_images(*make_synthetic_shapes(n, seed=seed))
                      for n, seed in zip(synthetic_size, (0, 1)))
        return train, val, len(SYNTHETIC_CLASSES)
    if data == "cifar10":
        try:  # torchrun's processes download in turn: the first fetches, the others check its files
            with one_at_a_time(data_path) if download else contextlib.nullcontext():
                train = torchvision.datasets.CIFAR10(data_path, train=True, download=download)
                val = torchvision.datasets.CIFAR10(data_path, train=False, download=download)
        except RuntimeError:
            raise UserError(f"CIFAR-10 not found under --data_path {data_path}; add --download or "
                            "point --data_path at the folder holding cifar-10-batches-py") from None
        return array_images(train.data, train.targets), array_images(val.data, val.targets), 10
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path} does not exist; point it at the folder holding "
                        "train/ and val/")
    classes = None  # every sub-folder is a class
    if data == "in100":
        classes, train = sorted(IMAGENET100_CLASSES), os.path.join(data_path, "train")
        present = set(os.listdir(train)) if os.path.isdir(train) else set()
        missing = [c for c in classes if c not in present]
        if missing:
            raise UserError(f"--data in100: {len(missing)} of the 100 ImageNet-100 (CMC) classes "
                            f"are missing from {train}, such as {', '.join(missing[:3])}; point "
                            "--data_path at the ImageNet-1K root or a folder of those classes")
    for root in (os.path.join(data_path, "train"), os.path.join(data_path, "val")):
        if not os.path.isdir(root):
            raise UserError(f"{root} is not a folder; --data_path must hold train/ and val/")
    try:  # val labelled by train's classes: val may lack one, never add one
        train = ClassFolder(os.path.join(data_path, "train"), classes)
        val = ClassFolder(os.path.join(data_path, "val"), train.classes, allow_empty=True)
    except FileNotFoundError as e:
        raise UserError(f"no images in a folder of {data_path} ({e}); ImageFolder wants one "
                        "sub-folder of images per class") from None
    extra = sorted({e.name for e in os.scandir(val.root) if e.is_dir()} - set(train.classes))
    if extra and classes is None:  # (in100's val/ may be ImageNet-1K's: it takes its 100)
        raise UserError(f"{val.root} has classes that train/ lacks ({', '.join(extra[:3])}); "
                        "remove them from val/ or add them to train/")
    if not len(val):
        raise UserError(f"no images in {val.root}; it takes train/'s class folders of images")
    return train, val, len(train.classes)


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # bad files, PIL's


def read_sample(base, index):
    """base[index], an (image, label), or None if its file is unreadable, named on stderr."""
    try:
        return base[index]
    except UNREADABLE as e:
        print(f"patchwise: warning: unreadable image {base.samples[index][0]} ({e})",
              file=sys.stderr)
        return None


class MultiViewDataset(torch.utils.data.Dataset):
    """PW-Self samples of (image, label)s keyed (epoch, index), every draw from a generator
    seeded by (seed, epoch, index). A worker decodes, crops, flips; colour waits for the device."""

    def __init__(self, base, seed, global_size, local_size, n_local, patch_size,
                 photometric="patch", global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                 blur_sigma=(0.1, 2.0)):
        self.base, self.seed, self.blur_sigma, self.n_local = base, seed, blur_sigma, n_local
        self.spatial = (global_size, local_size, n_local, global_scale, local_scale)
        # Photometric draws per view: one per patch (PW-Self), or one for the whole view (DINO).
        self.tiles = [(s // patch_size) ** 2 if photometric == "patch" else 1
                      for s in (global_size, local_size)]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng((self.seed % 2 ** 64, epoch, index))  # numpy wants seeds >= 0
        bad = 0
        while (sample := read_sample(self.base, index)) is None:  # replaced, counted: another
            bad += 1  # image from this sample's generator, the same on every run
            index = int(rng.integers(len(self.base)))
        glob, local, box, flip = spatial_views(sample[0], rng, *self.spatial)
        tile_g, view_g = draw_photometric_params(rng, 2, self.tiles[0], P_BLUR_GLOBAL,
                                                 P_SOLARIZE_GLOBAL, blur_sigma=self.blur_sigma)
        tile_l, view_l = draw_photometric_params(rng, self.n_local, self.tiles[1], P_BLUR_LOCAL,
                                                 P_SOLARIZE_LOCAL, blur_sigma=self.blur_sigma)
        return dict(global_views=glob, local_views=local, box=box, flip=flip, label=sample[1],
                    bad=bad, tile_global=tile_g, tile_local=tile_l,
                    view_params=torch.cat([view_g, view_l]))


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler of (epoch, index) keys that can start at a resumed run's batch. Rank r
    takes every world-th index of one permutation: the global batches do not depend on the world."""

    def __init__(self, dataset, num_replicas, rank, seed, batch_size):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.batch_size, self.start = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start:]])

    def __len__(self):
        return self.num_samples - self.start


class EvalDataset(torch.utils.data.Dataset):
    """Evaluation inputs, uint8 (3, S, S): DINO's short side resized to size / 0.875 and centre
    crop; small images (CIFAR-10's 32 px) whole, as the CIFAR literature evaluates them."""

    def __init__(self, base, size):
        self.base, self.size = base, size
        self.resize = size if size <= SMALL_SIDE else round(size / 0.875)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        import torchvision.transforms.functional as TF  # on tensors: DINO's Resize, CenterCrop
        sample = read_sample(self.base, index)
        if sample is None:  # the evaluation still needs a row for it: a black image
            sample = torch.zeros(3, 1, 1, dtype=torch.uint8), self.base.targets[index]
        img = TF.resize(sample[0], self.resize, TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(img, self.size), sample[1], index


# ---- Evaluation: DINO's k-NN and CLIP's linear probe of a frozen backbone -----------------------

def progress_reporter(log, what, total, unit, every=30):
    """report(done) logs '  what done/total unit, ETA h:mm:ss' at most every `every` seconds, so
    long work (ImageNet's features, its linear probe) shows where it is."""
    start = last = time.time()

    def report(done):
        nonlocal last
        if log and time.time() - last > every:
            last = time.time()
            eta = datetime.timedelta(seconds=int((last - start) / done * (total - done)))
            log(f"  {what} {done}/{total} {unit}, ETA {eta}", flush=True)
    return report


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, ks=(20,), T=0.07,
                 num_classes=None):
    """The k most cosine-similar train images (normalised features (N, D)) vote, weights exp(sim /
    T), for every k of ks from one similarity and top-k, in chunks of 2^27 similarities; under
    torchrun each rank votes for a share (all must call it). Returns {k: (top-1, top-5)} in %."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    chunk = max(1, 2 ** 27 // len(train_features))
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    hits = torch.zeros(len(ks), 2, device=test_features.device)  # top-1, top-5 per k
    for start in range(rank * chunk, len(test_features), world * chunk):
        sim = test_features[start:start + chunk] @ train_features.T  # (c, N_train)
        sim_k, idx = sim.topk(min(max(ks), len(train_features)), dim=1)  # (c, k_max), sorted
        for j, k in enumerate(ks):  # the first k of them vote
            votes = torch.zeros(len(sim), num_classes, device=sim.device)
            votes.scatter_add_(1, train_labels[idx[:, :k]], (sim_k[:, :k] / T).exp())  # (c, C)
            score, pred = votes.topk(min(5, num_classes), dim=1)  # (c, 5)
            # A class no neighbour voted for is no prediction, even if it ties into the top 5.
            correct = (pred == test_labels[start:start + chunk].unsqueeze(1)) & (score > 0)
            hits[j] += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()])
    return dict(zip(ks, (100.0 * all_reduce(hits) / len(test_features)).tolist()))


@torch.no_grad()
def extract_features(backbone, dataset, batch_size, device, num_workers=0, log=None, linear=None):
    """Normalised CLS features (N, D), labels (N,), with linear = (n_last_blocks, avgpool) DINO's
    probe's float16 features (N, F). Each rank extracts a share; all end with all, in order."""
    world = dist.get_world_size() if _distributed() else 1
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False) if world > 1 else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, generator=torch.Generator(),
                                         pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    out = dict(cls=[], label=[], index=[], linear=[])  # a tensor a batch; index: the dataset's
    report = progress_reporter(log, "features", len(loader), "batches")
    for b, (x, y, idx) in enumerate(loader):
        x = imagenet_normalize(x.to(device, non_blocking=True).float() / 255)  # float32: eval_knn's
        blocks = backbone.get_intermediate_layers(x, linear[0] if linear else 1)  # (B, T, D)s
        out["cls"].append(F.normalize(blocks[-1][:, 0], dim=1))  # (B, D) the last block's
        out["label"].append(y.to(device, non_blocking=True))
        out["index"].append(idx.to(device, non_blocking=True))
        if linear:
            pooled = [blocks[-1][:, 1:].mean(dim=1)] if linear[1] else []
            out["linear"].append(torch.cat([t[:, 0] for t in blocks] + pooled, 1).half())  # (B, F)
        report(b + 1)
    backbone.train(was_training)
    out = {key: torch.cat(t) for key, t in out.items() if t}
    for key, t in out.items() if world > 1 else []:  # DistributedSampler pads: equal counts
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t)
        out[key] = torch.cat(gathered)
        del gathered  # at ImageNet scale each copy of the probe's features is gigabytes
    index = out.pop("index")
    for key, t in out.items():  # into the dataset's order; the padding repeats rows alike
        out[key] = t.new_empty((len(dataset), *t.shape[1:])).index_copy_(0, index, t)
    return out["cls"], out["label"], out.get("linear")


@torch.no_grad()
def logistic_objective(x, y, W, b, mean, std, l2, chunk=65536):
    """Mean cross-entropy of softmax(z W^T + b), z = (x - mean) / std, plus l2 / 2 |W|^2, and its
    gradient, written out; W (C, F): a CPU multiplies x by it twice as fast as by an (F, C). x (N,
    F) is read in float32 chunks, standardised through W: float16 features have no float32 copy."""
    W_x = W / std  # z W^T + b = x W_x^T + b_x
    b_x = b - W_x @ mean
    loss, grad_W, grad_b = x.new_zeros((), dtype=W.dtype), torch.zeros_like(W), torch.zeros_like(b)
    for i in range(0, len(x), chunk):
        xc, target = x[i:i + chunk].float(), y[i:i + chunk]  # (c, F), (c,)
        logits = F.linear(xc, W_x, b_x)  # (c, C)
        loss += (logits.logsumexp(1) - logits.gather(1, target.unsqueeze(1)).squeeze(1)).sum()
        g = logits.softmax(1)
        g[torch.arange(len(g), device=g.device), target] -= 1
        grad_W += g.T @ xc  # (C, F)
        grad_b += g.sum(0)
    grad_W = (grad_W - grad_b.unsqueeze(1) * mean) / std  # g^T z, z = (x - mean) / std
    return loss / len(x) + l2 / 2 * W.square().sum(), grad_W / len(x) + l2 * W, grad_b / len(x)


def fit_logistic(x, y, num_classes, l2, mean, std, basis, init=None, max_iter=1000, report=None):
    """logistic_objective by full-batch L-BFGS (CLIP's probes) from init (W, b) or zeros, to a
    gradient below 1e-6 or max_iter iterations, in V, W = V (s + l2)^-1/2 U^T, (s, U) = basis: ViT
    features are correlated, and in their covariance's eigenbasis it takes far fewer iterations."""
    s, U = basis
    scale = (s + l2).rsqrt()  # (F,)
    W, b = init or (U.new_zeros(num_classes, len(s)), U.new_zeros(num_classes))
    V, b = (W @ U / scale).requires_grad_(), b.clone().requires_grad_()  # L-BFGS reads .grad
    opt = torch.optim.LBFGS([V, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")
    evals = 0

    def closure():
        nonlocal evals
        loss, grad_W, b.grad = logistic_objective(x, y, (scale * V.detach()) @ U.T, b.detach(),
                                                  mean, std, l2)
        V.grad = scale * (grad_W @ U)  # the chain rule through W = V scale U^T
        evals += 1
        if report:
            report(evals)
        return loss
    opt.step(closure)
    return ((scale * V) @ U.T).detach(), b.detach()


@torch.no_grad()
def feature_stats(x, chunk=65536):
    """Mean (F,) and std (F,) of features x (N, F), read a chunk at a time, and the eigenvalues
    (F,) and vectors (F, F) of the standardised features' covariance: fit_logistic's basis."""
    chunks = [x[i:i + chunk] for i in range(0, len(x), chunk)]
    mean = sum(c.float().sum(0) for c in chunks) / len(x)
    std = (sum((c.float() - mean).square().sum(0) for c in chunks) / len(x)).sqrt().clamp_min(1e-6)
    cov = sum(z.T @ z for z in ((c.float() - mean) / std for c in chunks)) / len(x)  # (F, F)
    s, U = torch.linalg.eigh(cov)
    return mean, std, (s.clamp_min(0), U)


@torch.no_grad()
def linear_accuracy(x, y, W, b, mean, std):
    """Top-1 and top-5 in percent of the classifier (W (C, F), b) on standardised x (N, F)."""
    top1 = top5 = 0
    W_x = W / std  # (C, F), the standardisation folded in as in logistic_objective
    b_x = b - W_x @ mean
    for i in range(0, len(x), 65536):
        logits = F.linear(x[i:i + 65536].float(), W_x, b_x)  # (c, C)
        hit = logits.topk(min(5, len(W)), dim=1).indices == y[i:i + 65536].unsqueeze(1)
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
    return 100 * top1 / len(x), 100 * top5 / len(x)


def linear_probe(train_x, train_y, val_x, val_y, num_classes, max_iter=1000, l2s=LINEAR_L2,
                 holdout=0.1, max_sweep=100_000, seed=0, log=None):
    """Linear probe on frozen features (N, F): for each L2 of l2s, strongest first, each from the
    last, max_iter / 20 iterations on the training features less a held-out tenth (10,000 at most);
    the best on those is refitted on all of them to convergence: only training images choose."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_x), generator=gen).to(train_x.device)
    n_held = min(max(1, int(holdout * len(train_x))), 10_000)
    held, fit = order[:n_held], order[n_held:n_held + max_sweep]
    mean, std, basis = feature_stats(train_x)
    fits, scores, params = [], [], None
    x_fit, y_fit, x_held, y_held = train_x[fit], train_y[fit], train_x[held], train_y[held]
    for j, l2 in enumerate(l2s):
        report = progress_reporter(log, f"linear probe, L2 {l2:g} ({j + 1}/{len(l2s)}):",
                                   max_iter // 16, "evaluations at most")
        params = fit_logistic(x_fit, y_fit, num_classes, l2, mean, std, basis, params,
                              max(1, max_iter // 20), report)
        scores.append(linear_accuracy(x_held, y_held, *params, mean, std)[0])
        fits.append(params)
    best = int(np.argmax(scores))  # the first, strongest L2 of the best
    report = progress_reporter(log, f"linear probe, L2 {l2s[best]:g} on all training images:",
                               max_iter * 5 // 4, "evaluations at most")
    W, b = fit_logistic(train_x, train_y, num_classes, l2s[best], mean, std, basis, fits[best],
                        max_iter, report)
    top1, top5 = linear_accuracy(val_x, val_y, W, b, mean, std)
    return dict(linear_top1=top1, linear_top5=top5, linear_l2=l2s[best])


def evaluate_backbone(backbone, train_set, val_set, num_classes, device, label, ks=(20,),
                      linear_iters=1000, batch_size=256, num_workers=0, seed=0, log=print):
    """k-NN for each k in ks and, if linear_iters, the linear probe of a frozen backbone on the
    EvalDatasets (train, val), a log line each. Returns {'knn_top1_k20': .., 'linear_top1': ..}."""
    # DINO's probe features, (n last blocks' CLS, mean patch?): to ViT-S (4, no); ViT-B (1, yes)
    protocol = ((1, True) if backbone.embed_dim >= 768 else (4, False)) if linear_iters else None
    (train_f, train_y, train_l), (val_f, val_y, val_l) = (
        extract_features(backbone, s, batch_size, device, num_workers, log, protocol)
        for s in (train_set, val_set))
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    knn = knn_classify(train_f, train_y, val_f, val_y, ks, num_classes=num_classes)
    results = {f"knn_top{t}_k{k}": v for k, tops in knn.items() for t, v in zip((1, 5), tops)}
    log(f"k-NN of the {label}: " + "  ".join(f"k={k}: top-1 {results[f'knn_top1_k{k}']:.2f}% top-5 "
                                             f"{results[f'knn_top5_k{k}']:.2f}%" for k in ks))
    if linear_iters:
        probe = [linear_probe(train_l, train_y, val_l, val_y, num_classes, linear_iters,
                              seed=seed, log=log)]
        if _distributed():  # every rank fitted the same features; rank 0's numbers are reported
            dist.broadcast_object_list(probe, src=0)
        results.update(probe[0])
        log(f"linear probe of the {label} ({train_l.shape[1]} features, L2 "
            f"{results['linear_l2']:g} chosen on held-out training images): top-1 "
            f"{results['linear_top1']:.2f}% top-5 {results['linear_top5']:.2f}%", flush=True)
    return results


# ---- Weights in and out: checkpoints, and backbones in DINO's and timm's layouts -----------------

# What a run going on from its checkpoint must share with it: every flag that changes what it
# computes but --epochs (longer only), and where the data lies, how it is loaded, logged, evaluated.
RUN_FLAGS = tuple(k for k in DEFAULTS if k not in ("epochs", "num_workers", "log_every",
                                                   "knn_every", "knn_k", "linear_iters")) + (
    "data", "synthetic_size", "photometric", "matching", "patch_loss_weight", "loss_weighting",
    "seed")


def save_checkpoint(state, path):
    """Temporary file, fsync, rename: a kill at any moment leaves a whole checkpoint, old or new."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_weights(path, trust=False):
    """torch.load with the safe loader, which reads our checkpoints; a file that needs unpickling
    (DINO's checkpoints hold an argparse.Namespace) only when trusted; one line if unreadable."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; point --pretrained at a weights file or "
                        "--output_dir at a training run")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # torch's types for these differ across versions: its words do not
        if trust or "unsupported global" not in str(e).lower():
            raise UserError(f"cannot read {path} as a PyTorch file ({type(e).__name__}): it is "
                            "empty, truncated or not a checkpoint; pass another file") from None
        raise UserError(f"{path} holds pickled Python objects besides tensors (DINO's keep their "
                        "args so); if you trust the file, add --trust_checkpoint") from None


def read_checkpoint(path, args):
    """The checkpoint a run goes on from; one line naming each flag of RUN_FLAGS that differs from
    its run's (a warm-up the user did not set follows --epochs), and a shorter --epochs."""
    ckpt = read_weights(path)
    flags = [k for k in RUN_FLAGS if k != "warmup_epochs" or k in args.given]
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()}
    diff = [f"--{k} {saved.get(k)} (checkpoint) vs {getattr(args, k)} (now)" for k in flags
            if saved.get(k) != getattr(args, k)]
    if args.epochs < saved["epochs"]:
        diff.append(f"--epochs {saved['epochs']} (checkpoint) vs {args.epochs} (now, shorter)")
    if diff:
        raise UserError(f"{path} was trained with other flags: {', '.join(diff)}; pass the "
                        "checkpoint's values or another --output_dir")
    return ckpt


def load_backbone(backbone, state, source, key="teacher"):
    """Load into a ViT the backbone of our checkpoints (`key`: teacher or student), of DINO's (maybe
    'module.'-prefixed), DINO's backbone files or timm's ViTs, the position embedding resized to
    its grid; one line on a misfit."""
    state = next((state[k] for k in (key, "model", "state_dict") if isinstance(state.get(k), dict)),
                 state)
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    # without DINO's head or timm's classifier
    state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    pos, own_pos = state.get("pos_embed"), backbone.state_dict()["pos_embed"].shape
    if pos is not None and pos.shape != own_pos and pos.shape[-1] == own_pos[-1]:
        state["pos_embed"] = interpolate_pos_embed(pos, [math.isqrt(own_pos[1] - 1)] * 2)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:  # torch's lines as one, cut short: a misfit may name every key
        raise UserError(f"{source} does not fit this ViT (dim {backbone.embed_dim}, patch "
                        f"{backbone.patch_size}): {' '.join(str(e).split())[:400]}; set --arch, "
                        "--patch_size and --depth to the file's") from None


# ---- The run: training ---------------------------------------------------------------------------

def prepare_output_dir(path):
    """The checkpoint's path, in a folder made and tried now: not writable fails before training."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"--output_dir {path} is not writable ({e.strerror}); choose another "
                        "folder") from None
    return os.path.join(path, "checkpoint.pth")


def agree_on_start(ckpt, output_dir):
    """The (epoch, iteration) every rank goes on from, (0, 0) for a new run; one line naming a rank
    that sees another checkpoint, or none: --output_dir is not on a filesystem every node sees."""
    seen = [f"epoch {ckpt['epoch']}, iteration {ckpt['iteration']}" if ckpt else "no checkpoint"]
    if _distributed():
        seen *= dist.get_world_size()
        dist.all_gather_object(seen, seen[0])
    other = next((r for r in range(len(seen)) if seen[r] != seen[0]), None)
    if other is not None:
        raise UserError(f"rank {other} sees {seen[other]} in {output_dir}, rank 0 {seen[0]}: put "
                        "--output_dir on a filesystem every node sees")
    return (ckpt["epoch"], ckpt["iteration"]) if ckpt else (0, 0)


def keep_log(path, start_epoch, last_stats):
    """Rewrite log.txt to the lines of the epochs before start_epoch, each once (a new run: none);
    the checkpoint's stats stand in for the last one if its evaluation was cut short."""
    lines = {}
    for line in open(path) if start_epoch and os.path.exists(path) else ():
        with contextlib.suppress(ValueError):  # a line cut short by a kill
            lines[json.loads(line)["epoch"]] = line
    if last_stats:
        lines.setdefault(last_stats["epoch"], json.dumps(last_stats) + "\n")
    with open(path, "w") as f:
        f.writelines(lines[e] for e in sorted(lines) if e < start_epoch)


def encoder_from_args(args, drop_path=0.0):
    return build_encoder(args.arch, args.patch_size, args.out_dim, drop_path, args.depth,
                         args.global_size, args.head_hidden_dim, args.bottleneck_dim,
                         args.norm_last_layer)


def start_run(args):
    """Join torchrun's process group if launched by it (NCCL on CUDA, gloo on CPU), else run alone;
    a log on rank 0 with resolve_args' notes. Returns (rank, world, device, log, amp dtype)."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but no GPU is visible; use --device cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not _distributed():
        dist.init_process_group("nccl" if cuda else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    for note in args.notes:
        log(note)
    # bf16 on Ampere and newer GPUs, else fp16 with a GradScaler as DINO on V100s; float32 on CPUs
    bf16 = cuda and torch.cuda.get_device_capability(device)[0] >= 8
    return rank, world, device, log, (torch.bfloat16 if bf16 else torch.float16) if cuda else None


@contextlib.contextmanager
def agreed_errors(device):
    """Every rank runs the block (no collective inside); a UserError on any rank stops them all,
    its line printed once by the lowest rank that met it: the file or memory that one node lacks
    is named, not lost to torchrun's silent kill of the other ranks."""
    error = None
    try:
        yield
    except UserError as e:
        error = e
    if _distributed():
        failed = torch.zeros(dist.get_world_size(), device=device)
        failed[dist.get_rank()] = error is not None
        failed = all_reduce(failed).nonzero().flatten().tolist()  # the ranks that met one
        if failed:
            error = error if dist.get_rank() == failed[0] else UserError("")  # "": print nothing
            error.rank = failed[0]
    if error:
        raise error


LOG_KEYS = ("train_loss", "train_loss_image", "train_loss_patch",  # log.txt, one line an epoch
            "teacher_entropy_cls_target", "teacher_entropy_cls_batch_mean",  # see PWSelfLoss
            "teacher_entropy_patch_target", "teacher_entropy_patch_batch_mean")


def collapse_warning(image_loss_range, entropy_cls, out_dim):
    """(kind, warning line) if the image level collapsed this epoch, else None, from the epoch's
    lowest and highest image loss and its CLS entropies: of a target, of the batch's mean target."""
    ln_k = math.log(out_dim)
    target, batch_mean = entropy_cls
    flat_loss = 0.99 * ln_k <= image_loss_range[0] and image_loss_range[1] <= 1.01 * ln_k
    if flat_loss or target >= 0.99 * ln_k:
        return "uniform", ("warning: collapse: uniform CLS targets (image loss or their entropy "
                           f"within 1% of ln K = {ln_k:.3f} for an epoch): try more --epochs, "
                           "then a lower --teacher_temp or --out_dim")
    if batch_mean < math.log(2):
        return "one dimension", ("warning: collapse: all CLS targets peak on one dimension "
                                 f"(entropy of their batch mean {batch_mean:.2f} < ln 2): raise "
                                 "--teacher_temp towards 0.07, or lower --lr")
    # batch mean - target: what the targets tell apart, a few nats when healthy
    if batch_mean - target < 0.05 and target < 0.95 * ln_k:
        return "constant", ("warning: collapse: nearly the same CLS target for every image "
                            f"(entropy of the batch mean {batch_mean:.2f}, of a target "
                            f"{target:.2f}): raise --momentum_teacher to 0.996, or lower --lr")


NEVER = 2 ** 62  # first_bad while every loss has been finite


def stop_if_not_finite(first_bad, model, step, ckpt_path, weights_too=False):
    """One line and the end of the run, on every rank at the same step, if the loss of any rank
    went non-finite (first_bad: this rank's first such step, or NEVER) or, with weights_too
    (before a save), the weights. Syncs the ranks: called only to log or save."""
    bad, what = int(all_reduce(first_bad.clone(), "min").item()), "loss"
    if (bad == NEVER and weights_too
            and not torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
        bad, what = step, "weights"
    if bad < NEVER:
        raise UserError(f"the {what} became non-finite at iteration {bad} of the run; {ckpt_path} "
                        "holds the last good state: lower --lr, --min_lr, --weight_decay(_end) or "
                        "--teacher_temp (whichever you raised), in another --output_dir")


def build_models(args, device, rank, world, pretrained=None):
    """Student (in DDP), teacher, equal at the start (from the `pretrained` state's backbone if
    given), and the modules the step calls (compiled)."""
    torch.manual_seed(args.seed)  # the same init on every rank: DDP syncs the student only
    student = encoder_from_args(args, args.drop_path).to(device)
    teacher = encoder_from_args(args).to(device)
    torch.manual_seed((args.seed * 1000 + rank) % 2 ** 64)  # from here on drop path, per rank
    if pretrained:
        load_backbone(student.backbone, pretrained, args.pretrained, args.checkpoint_key)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if world > 1:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        return student, teacher, torch.compile(student), torch.compile(teacher)
    return student, teacher, student, teacher


def evaluate_teacher(args, backbone, datasets, world, device, label, linear, log):
    """evaluate_backbone with args' flags; datasets: build_datasets' (train, val, classes)."""
    train_base, val_base, num_classes = datasets
    args.doing = f"the teacher's evaluation on the features of {len(train_base)} images"
    return evaluate_backbone(backbone, EvalDataset(train_base, args.global_size),
                             EvalDataset(val_base, args.global_size), num_classes, device, label,
                             args.knn_k, args.linear_iters if linear else 0,
                             args.batch_size // world, args.num_workers, args.seed, log)


def train(args):
    """The whole run. Only the drivers (train, main, the tools') and their helpers read `args`."""
    rank, world, device, log, amp_dtype = start_run(args)
    local_batch = args.batch_size // world
    with agreed_errors(device):  # what one node may lack: a folder, a file, the data
        args.checkpoint = ckpt_path = prepare_output_dir(args.output_dir)
        # A command run again, or restarted by torchrun, goes on with its run (as DINO's does).
        ckpt = read_checkpoint(ckpt_path, args) if os.path.exists(ckpt_path) else None
    start_epoch, start_iter = agree_on_start(ckpt, args.output_dir)
    if rank == 0:
        keep_log(os.path.join(args.output_dir, "log.txt"), start_epoch, ckpt and ckpt.get("stats"))
    if start_epoch >= args.epochs:  # finished: the checkpoint stays as it is, nothing else is read
        log(f"{ckpt_path} holds this run, finished at epoch {start_epoch} (log.txt): a larger "
            "--epochs goes on with it, patchwise_tools.py --eval evaluates it")
        return {}
    with agreed_errors(device):
        pretrained = args.pretrained and read_weights(args.pretrained, args.trust_checkpoint)
        datasets = build_datasets(args.data, args.data_path, args.download, args.synthetic_size)

    # Data
    dataset = MultiViewDataset(datasets[0], args.seed, args.global_size, args.local_size,
                               args.n_local, args.patch_size, args.photometric, args.global_scale,
                               args.local_scale, args.blur_sigma)
    sampler = EpochSampler(dataset, world, rank, args.seed, local_batch)
    loader = torch.utils.data.DataLoader(  # its own generator: the global one drives drop path
        dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.num_workers > 0,
        generator=torch.Generator())
    iters = len(sampler) // local_batch
    if iters == 0:
        raise UserError(f"the training set has {len(dataset)} images, fewer than one batch of "
                        f"{args.batch_size}; lower --batch_size")

    # Models, optimiser and schedules (args.doing: what an out-of-memory error will name)
    student, teacher, student_step, teacher_step = build_models(args, device, rank, world,
                                                                pretrained)
    args.doing = f"building the schedules of --epochs {args.epochs} x {iters} iterations"
    loss_fn = PWSelfLoss(args.out_dim, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, patch_loss_weight=args.patch_loss_weight,
                         loss_weighting=args.loss_weighting).to(device)
    optimizer = torch.optim.AdamW(param_groups(student), fused=device.type == "cuda")
    # DINO's linear scaling rule: the peak learning rate grows with the global batch.
    lr_schedule = cosine_schedule(args.lr * args.batch_size / 256, args.min_lr, args.epochs,
                                  iters, args.warmup_epochs)
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters)

    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if ckpt:  # all of it, this rank's RNG too (drop path's draws) when the world size is the same
        for part, key in ((unwrap(student), "student"), (teacher, "teacher"),
                          (optimizer, "optimizer"), (loss_fn, "loss")):
            part.load_state_dict(ckpt[key])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == world:
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if device.type == "cuda" and "cuda" in ckpt["rng"][rank]:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        log(f"resumed from {ckpt_path}: epoch {start_epoch}, iteration {start_iter}")
        if ckpt["args"]["epochs"] != args.epochs:  # longer: read_checkpoint refuses shorter
            log(f"lr, weight decay and momentum schedules recomputed for {args.epochs} epochs")

    def save(epoch, iteration, stats=None):
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        rngs = [rng] * world  # drop path's draws differ per rank: every rank's generator
        if world > 1:
            dist.all_gather_object(rngs, rng)
        state = dict(student=unwrap(student).state_dict(), teacher=teacher.state_dict(),
                     optimizer=optimizer.state_dict(), loss=loss_fn.state_dict(), epoch=epoch,
                     iteration=iteration, args=vars(args), rng=rngs, stats=stats,
                     scaler=scaler.state_dict())
        if rank == 0:
            save_checkpoint(state, ckpt_path)

    if start_epoch == 0 and start_iter == 0 and not args.no_initial_knn:
        # ImageNet: the k-NN alone; the probe would add 3.9 GB of features a process and minutes
        evaluate_teacher(args, teacher.backbone, datasets, world, device,
                         "randomly initialised teacher", args.data not in ("in100", "in1k"), log)
    log(f"training {args.arch}/{args.patch_size} (depth {args.depth or 12}) on {args.data}: "
        f"{len(dataset)} images, {args.epochs} epochs of {iters} iterations, global batch "
        f"{args.batch_size} on {world} process(es), {device.type}")

    # The loop: train_step's outputs summed on the device (no sync), read at log lines and epoch
    # ends; first_bad: this rank's first step whose loss is not finite
    first_bad = torch.full((), NEVER, dtype=torch.long, device=device)
    results, warned, ln_k = {}, set(), math.log(args.out_dim)
    run_start, first_step = time.time(), start_epoch * iters + start_iter
    for epoch in range(start_epoch, args.epochs):
        args.doing = "a training step"
        sampler.set_epoch(epoch, start_iter)
        sums = torch.zeros(7, dtype=torch.float64, device=device)  # over the epoch
        window_sums, window_start, window_time = sums.clone(), start_iter, time.time()  # the log's
        image_low_high = torch.tensor([math.inf, -math.inf], device=device)  # this rank's
        bad_images, logs = 0, 0  # unreadable files met this epoch (replaced by others); log lines
        for it, batch in enumerate(loader, start=start_iter):
            step = epoch * iters + it
            logged = (step + 1) % args.log_every == 0 or it + 1 == iters
            losses = train_step(  # (7,) loss, image, patch, teacher entropies (on logged steps)
                student_step, teacher_step, loss_fn, optimizer, batch, epoch=epoch,
                lr=float(lr_schedule[step]), wd=float(wd_schedule[step]),
                momentum=float(momentum_schedule[step]), patch_size=args.patch_size,
                matching=args.matching, clip_grad=args.clip_grad,
                freeze_last_layer=epoch < args.freeze_last_layer, amp_dtype=amp_dtype,
                scaler=scaler, measure_entropy=logged)
            first_bad = torch.where(torch.isfinite(losses[0]), first_bad, first_bad.clamp(max=step))
            sums += losses
            image_low_high = torch.stack([image_low_high[0].minimum(losses[1]),
                                          image_low_high[1].maximum(losses[1])])
            bad_images += int(batch["bad"].sum())  # a CPU tensor: no device sync
            if logged:
                stop_if_not_finite(first_bad, unwrap(student), step, ckpt_path)
                n, now, logs = it + 1 - window_start, time.time(), logs + 1
                m = (all_reduce(sums - window_sums) / world).tolist()  # entropies: this step's
                m[:3] = [v / n for v in m[:3]]  # the losses: the window's means
                speed = n * args.batch_size / max(now - window_time, 1e-9)
                rate = f"{speed:.0f}" if speed >= 1 else f"{speed:.2g}"  # 0.25 img/s, not 0
                eta = (now - run_start) / (step + 1 - first_step) * (args.epochs * iters - step - 1)
                window_sums, window_start, window_time = sums.clone(), it + 1, now
                log(f"epoch {epoch + 1}/{args.epochs} it {it + 1}/{iters}  loss {m[0]:.5f} (image "
                    f"{m[1]:.5f} patch {m[2]:.5f})  teacher entropy of a target/of the batch mean: "
                    f"cls {m[3]:.2f}/{m[4]:.2f} patch {m[5]:.2f}/{m[6]:.2f} (ln K {ln_k:.2f})  lr "
                    f"{lr_schedule[step]:.2e}  wd {wd_schedule[step]:.3g}  mom "
                    f"{momentum_schedule[step]:.5f}  {rate} img/s  ETA "
                    f"{datetime.timedelta(seconds=int(eta))}", flush=True)
            if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and it + 1 < iters:
                stop_if_not_finite(first_bad, unwrap(student), step, ckpt_path, weights_too=True)
                save(epoch, it + 1)

        # End of the epoch: collapse check, unreadable files, checkpoint, evaluation, log.txt
        stop_if_not_finite(first_bad, unwrap(student), step, ckpt_path, weights_too=True)
        n = iters - start_iter  # this epoch's iterations
        m = (all_reduce(sums.clone()) / world).tolist()  # entropies: the mean of the logged steps
        stats = dict(zip(LOG_KEYS, [v / n for v in m[:3]] + [v / logs for v in m[3:]]))
        collapse = collapse_warning(image_low_high.tolist(), (stats["teacher_entropy_cls_target"],
                                    stats["teacher_entropy_cls_batch_mean"]), args.out_dim)
        if collapse and collapse[0] not in warned:  # each kind once per run
            warned.add(collapse[0])
            log(collapse[1], flush=True)
        bad_images = int(all_reduce(torch.tensor([bad_images], device=device)).item())
        seen = n * args.batch_size
        if bad_images > args.max_bad_images * seen:
            raise UserError(f"{bad_images} of {seen} images in epoch {epoch + 1} were unreadable, "
                            f"over --max_bad_images {args.max_bad_images}: fix those named above")
        start_iter = 0
        stats.update(ln_K=ln_k, bad_images=bad_images, train_lr=float(lr_schedule[step]),
                     train_wd=float(wd_schedule[step]), epoch=epoch)
        save(epoch + 1, 0, stats)  # its stats: log.txt's line, should the evaluation be cut short
        last = epoch + 1 == args.epochs
        if last or (args.knn_every and (epoch + 1) % args.knn_every == 0):
            label = "trained teacher" if last else f"teacher after epoch {epoch + 1}"
            results = evaluate_teacher(args, teacher.backbone, datasets, world, device, label,
                                       last, log)
            stats.update(results)
        if rank == 0:
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(stats) + "\n")
    return results


# ---- The command line: flags, presets, checks ----------------------------------------------------

def folder_preset(data_path, cuda):
    """PRESETS['folder'], or the demo's sized to the set for small images; its log line(args)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS  # what ImageFolder will read
    root = os.path.join(data_path, "train")
    classes = sorted(e.path for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []

    def images(folder):
        return sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
                      if f.lower().endswith(IMG_EXTENSIONS))
    sides = []
    for folder in classes[::max(1, len(classes) // 16)][:16]:  # a few headers from a few classes
        for path in images(folder)[:2]:
            try:
                with Image.open(path) as img:
                    sides.append(min(img.size))
            except UNREADABLE:  # the median of the others decides
                pass
    side = sorted(sides)[len(sides) // 2] if sides else None
    run = lambda a: f"{a.arch}/{a.patch_size} at {a.global_size}/{a.local_size} px"  # noqa: E731
    if side is None or side > SMALL_SIDE:
        return PRESETS["folder"], lambda a: f"ImageNet recipe for --data folder: {run(a)}"
    samples = CPU_SAMPLES * (10 if cuda else 1)  # a GPU trains ten times longer in the same minutes
    n = sum(len(images(folder)) for folder in classes)  # small images: a small count to make
    preset = {**PRESETS["synthetic"], "knn_every": 0, "epochs": max(1, round(samples / n)),
              "num_workers": 8 if cuda else 0}
    return preset, lambda a: (f"small-image recipe for --data folder (median side {side} px <= "
                              f"{SMALL_SIDE}): {run(a)}, {a.epochs} epochs of {n} images, about "
                              f"{a.epochs * n} samples, on the {'GPU' if cuda else 'CPU'}")


class UserError(Exception):
    """A mistake in the command line or the data: main prints its one-line message, no traceback,
    on rank 0 or on the rank set in .rank (agreed_errors); an empty message prints nothing."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main, as for every other user mistake
        raise UserError(f"{message}; see --help")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the real default of a flag of DEFAULTS and each preset's value that differs."""

    def _get_help_string(self, action):
        if action.dest not in DEFAULTS:  # a default of None is 'not given': nothing to show
            return action.help if action.default is None else super()._get_help_string(action)
        show = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
        value = "12, the architecture's own" if action.dest == "depth" else DEFAULTS[action.dest]
        presets = [f"{name} {show(p[action.dest])}" for name, p in PRESETS.items()
                   if p.get(action.dest, value) != value]
        text = f"default: {show(value)}" + (f"; presets: {', '.join(presets)}" if presets else "")
        return f"{action.help} ({text})".replace("%", "%%")


def ranged(kind, ok, words):
    """An argparse type: kind(text) if finite and ok(value), else the one line naming the range."""
    def parse(text):
        try:
            value = kind(text)
            fine = (kind is int or math.isfinite(value)) and ok(value)
        except ValueError:
            fine = False
        if not fine:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it takes {words}")
        return value
    return parse


def true_or_false(text):
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


# The types of the numeric flags; the bounds on sizes keep every shape within int64.
COUNT = ranged(int, lambda v: v >= 0, "0 or more")
POSITIVE_INT = ranged(int, lambda v: v > 0, "a positive integer")
WIDTH = ranged(int, lambda v: 0 < v <= 2 ** 24, "1 to 2^24")
SIDE = ranged(int, lambda v: 0 < v <= 2 ** 16, "1 to 2^16 px")
POSITIVE = ranged(float, lambda v: v > 0, "a positive number")
NON_NEGATIVE = ranged(float, lambda v: v >= 0, "0 or more")
FRACTION = ranged(float, lambda v: 0 <= v <= 1, "a value in [0, 1]")
AREA = ranged(float, lambda v: 0 < v <= 1, "a value in (0, 1]")


def build_parser():
    p = Parser(description="PW-Self: patch-wise self-supervised ViT pretraining (DINO + patches).",
               formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic", choices=list(PRESETS),
                   help="Dataset and preset: synthetic (the CPU demo's shapes), cifar10, in100 "
                        "(CMC's classes), in1k, folder (train/, val/; small images: the demo's).")
    d.add_argument("--data_path", default="data", help="Root of the dataset.")
    d.add_argument("--download", action="store_true", help="Download CIFAR-10 if it is missing.")
    d.add_argument("--synthetic_size", nargs=2, default=(5000, 1000), help="Train, val.",
                   type=ranged(int, lambda v: 0 < v <= 50_000, "1 to 50000 (made in memory)"))
    d.add_argument("--num_workers", type=COUNT, help="Data loader processes per rank.")
    d.add_argument("--max_bad_images", type=FRACTION, default=0.01, help="Unreadable images "
                   "tolerated in an epoch, as a fraction (each replaced by another and named).")
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=list(VIT_SIZES), help="ViT-tiny, -small or -base.")
    m.add_argument("--patch_size", type=int, choices=(4, 8, 16), help="Also the jitter's tile.")
    m.add_argument("--depth", type=ranged(int, lambda v: 0 < v <= 256, "1 to 256"),
                   help="Number of transformer blocks.")
    m.add_argument("--drop_path", help="Student's stochastic depth.",
                   type=ranged(float, lambda v: 0 <= v < 1, "a value in [0, 1)"))
    m.add_argument("--out_dim", help="K, the head's output size (CLS and patches).",
                   type=ranged(int, lambda v: 2 <= v <= 2 ** 24, "2 to 2^24"))
    m.add_argument("--head_hidden_dim", type=WIDTH, help="DINO head's MLP width.")
    m.add_argument("--bottleneck_dim", type=WIDTH, help="DINO head's bottleneck.")
    m.add_argument("--norm_last_layer", type=true_or_false, help="Freeze the last layer's norm.")
    a = p.add_argument_group("augmentation and matching")
    a.add_argument("--global_size", type=SIDE, help="Side of the 2 global views.")
    a.add_argument("--local_size", type=SIDE, help="Side of the local views.")
    a.add_argument("--n_local", help="Number of local views (0 allowed).",
                   type=ranged(int, lambda v: 0 <= v <= 32, "0 to 32 (DINO and iBOT use 8-10)"))
    a.add_argument("--global_scale", type=AREA, nargs=2, help="Crop area range, global views.")
    a.add_argument("--local_scale", type=AREA, nargs=2, help="Crop area range, local views.")
    a.add_argument("--blur_sigma", type=NON_NEGATIVE, nargs=2, help="Blur sigma range (0 0: off).")
    a.add_argument("--photometric", default="patch", choices=("patch", "view"),
                   help="patch: colour jitter, grayscale drawn per patch (PW-Self); view: (DINO).")
    a.add_argument("--matching", default="coords", choices=("coords", "intersection", "similarity"),
                   help="By the patch centre (ours), over the crops' intersection one to one (the "
                        "PW-Self code's), by feature similarity (EsViT).")
    l = p.add_argument_group("loss")
    l.add_argument("--patch_loss_weight", type=NON_NEGATIVE, default=1.0, help="0 is plain DINO.")
    l.add_argument("--loss_weighting", default="sum", choices=("sum", "token_mean"),
                   help="sum: L_image + w L_patch, each a mean; token_mean: the PW-Self code's.")
    l.add_argument("--teacher_temp", type=POSITIVE, help="Final teacher temperature (to 0.07).")
    l.add_argument("--warmup_teacher_temp", type=POSITIVE, help="Initial teacher temperature.")
    l.add_argument("--warmup_teacher_temp_epochs", type=COUNT, help="Epochs of its warm-up.")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=POSITIVE_INT, help="Global batch, split over the ranks.")
    o.add_argument("--epochs", type=ranged(int, lambda v: 0 < v <= 10 ** 6, "1 to 10^6"),
                   help="Training epochs (a resumed run may raise them).")
    o.add_argument("--lr", type=POSITIVE, help="Peak lr per 256 images, scaled with the batch.")
    o.add_argument("--min_lr", type=NON_NEGATIVE, help="Learning rate at the end.")
    o.add_argument("--warmup_epochs", type=NON_NEGATIVE, help="Epochs of lr warm-up.")
    o.add_argument("--weight_decay", type=NON_NEGATIVE, help="Initial weight decay.")
    o.add_argument("--weight_decay_end", type=NON_NEGATIVE, help="Final weight decay.")
    o.add_argument("--momentum_teacher", type=FRACTION, help="Initial teacher EMA momentum (to 1).")
    o.add_argument("--clip_grad", type=NON_NEGATIVE, help="Per-parameter gradient clip (0: off).")
    o.add_argument("--freeze_last_layer", type=COUNT, help="Epochs with the last layer fixed.")
    o.add_argument("--seed", default=0, help="Seeds the model and every draw.",
                   type=ranged(int, lambda v: -2 ** 63 <= v < 2 ** 63, "an integer of 64 bits"))
    r = p.add_argument_group("run")
    r.add_argument("--output_dir", default="output", help="Where checkpoint.pth and log.txt go.")
    r.add_argument("--resume", action="store_true", help="Kept for old scripts: runs go on anyway.")
    r.add_argument("--ckpt_every", type=COUNT, default=0, help="Also save every N iterations.")
    r.add_argument("--log_every", type=POSITIVE_INT, help="Log period in iterations.")
    r.add_argument("--knn_every", type=COUNT, help="k-NN every N epochs (0: at the end only).")
    r.add_argument("--knn_k", type=POSITIVE_INT, nargs="+", help="k values of the k-NN.")
    r.add_argument("--linear_iters", type=COUNT, help="The linear probe's L-BFGS iterations at "
                   f"most a fit, for each L2 of {LINEAR_L2} (0: no probe).")
    r.add_argument("--no_initial_knn", action="store_true", help="Skip evaluating the init.")
    r.add_argument("--device", help="cuda or cpu (default: cuda when available).")
    r.add_argument("--compile", action="store_true", help="torch.compile the step's models.")
    t = p.add_argument_group("weights (evaluation, pictures, export: patchwise_tools.py)")
    t.add_argument("--pretrained", help="Backbone weights to start from (or, in the tools, to "
                   "evaluate): ours, DINO's checkpoints or backbones, timm ViT state dicts.")
    t.add_argument("--checkpoint_key", default="teacher", choices=("teacher", "student"))
    t.add_argument("--trust_checkpoint", action="store_true", help="Unpickle it (DINO's files).")
    return p


def resolve_args(argv=None):
    """Parse the command line and fill every flag left unset from the preset, then DEFAULTS."""
    args = build_parser().parse_args(argv)
    preset, args.notes = PRESETS[args.data], []  # notes: what was chosen for the user, logged once
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.data == "folder":
        preset, recipe = folder_preset(args.data_path, args.device.startswith("cuda"))
    args.given = tuple(key for key in DEFAULTS if getattr(args, key) is not None)  # by the user
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, value))
    if args.data == "folder":
        args.notes.append(recipe(args))
    if args.warmup_epochs >= args.epochs and "warmup_epochs" not in args.given:  # no peak, no decay
        args.notes.append(f"the preset's {args.warmup_epochs:g} warm-up epochs outlast --epochs "
                          f"{args.epochs}: warm-up scaled to a tenth of the run, "
                          f"{args.epochs / 10:g} epochs")
        args.warmup_epochs = args.epochs / 10
    for key in ("global_scale", "local_scale", "blur_sigma", "knn_k", "synthetic_size"):
        setattr(args, key, tuple(getattr(args, key)))  # lists when given
    # More loader processes than the cores this rank may use only make them fight for the cores.
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all cores count
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # on this node, set by torchrun
    if cores * ranks > (os.cpu_count() or 1):  # the ranks share the cores, unless a launcher
        cores = max(1, cores // ranks)  # (SLURM's --cpus-per-task, numactl) gave each its own
    if args.num_workers > cores:
        args.notes.append(f"{args.num_workers} data workers asked for, {cores} used: its cores")
        args.num_workers = cores
    return args


def check_args(args):
    """Catch the configuration mistakes that would otherwise fail deep inside a run."""
    for name in ("global_scale", "local_scale", "blur_sigma"):  # each in range: the parser's
        low, high = getattr(args, name)
        if low > high:
            raise UserError(f"--{name} {low:g} {high:g}: give the smaller value first")
    for name in ("global_size", "local_size"):
        size, p = getattr(args, name), args.patch_size
        if size % p:
            raise UserError(f"--{name} {size} is not divisible by --patch_size {p}; use a multiple "
                            f"such as {size // p * p or p}")
    check_path("--data_path", args.data != "synthetic" and args.data_path, folder=True)
    check_path("--output_dir", args.output_dir, folder=True)
    check_path("--pretrained", args.pretrained, folder=False)
    world, b = int(os.environ.get("WORLD_SIZE", 1)), args.batch_size  # world: set by torchrun
    if b % world:
        raise UserError(f"--batch_size {b} does not split over {world} processes; use a multiple "
                        f"of {world} such as {max(world, b // world * world)}")


def check_path(flag, path, folder):
    """A path of the wrong kind, a file where a folder is wanted or the reverse, named up front."""
    if path and os.path.exists(path) and os.path.isdir(path) != folder:
        raise UserError(f"{flag} {path} is a {'file' if folder else 'folder'}; it takes a "
                        f"{'folder' if folder else 'file'}")


# ---- Main ----------------------------------------------------------------------------------------

def main(argv=None, run=None):
    """run(args): train, or patchwise_tools.py's evaluation of saved weights."""
    args = None
    try:
        args = resolve_args(argv)
        check_args(args)
        args.doing, args.checkpoint = "building the model", None
        result = (run or train)(args)
        if _distributed():  # no rank tears its gloo/NCCL connections down while another uses them
            dist.barrier()
            dist.destroy_process_group()
            # all is written: skip torch's teardown at exit, which aborts 1 gloo run in 25
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return result
    except UserError as e:  # rank 0's line, or that of the rank that alone met it (agreed_errors)
        rank = getattr(e, "rank", 0)
        if str(e) and int(os.environ.get("RANK", 0)) == rank:
            print(f"patchwise: error: {f'rank {rank}: ' if rank else ''}{e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # out of memory, anywhere: one line, on the rank it happened on
        if args is None or not (isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError))
                                or "DefaultCPUAllocator" in str(e)):
            raise
        where = "GPU" if isinstance(e, torch.cuda.OutOfMemoryError) else "host"
        saved = "nothing was saved"
        if args.checkpoint and os.path.exists(args.checkpoint):
            saved = f"the same command goes on from {args.checkpoint}"
        sizes = ", ".join(f"--{k} {(args.depth or 12) if k == 'depth' else getattr(args, k)}"
                          for k in ("batch_size", "n_local", "global_size", "local_size",
                                    "patch_size", "arch", "depth", "out_dim", "head_hidden_dim",
                                    "bottleneck_dim"))  # the flags that size a run's memory
        print(f"patchwise: error: out of {where} memory during {args.doing} ({sizes}); lower one "
              f"of them; {saved}", file=sys.stderr)
        sys.exit(2)
    finally:
        if _distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
