#!/usr/bin/env python3
"""patchwise's tools for saved weights, beside patchwise.py as DINO's eval_knn.py and
visualize_attention.py are beside main_dino.py: the k-NN and linear probe of a teacher, pictures of
the method on an image, and the teacher's backbone in DINO's released layout.

    python patchwise_tools.py --eval --output_dir output       # torchrun for several GPUs
    python patchwise_tools.py --show_matching photo.jpg --out matching.png
    python patchwise_tools.py --show_attention photo.jpg --out attention.png --output_dir output
    python patchwise_tools.py --export_backbone backbone.pth --output_dir output

Every flag of patchwise.py may follow: the model's (--arch, --patch_size, --depth, ...) and where
the weights are (--output_dir, whose checkpoint.pth is read, or --pretrained).
"""
import colorsys
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

import patchwise as pw


def grid_to_pixels(grid, patch_size):
    """A (g, g) per-patch tensor as a (g p, g p) per-pixel numpy array, each patch a flat block."""
    return grid.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1).numpy()


def pair_colour(i):
    """A distinct, saturated colour for the i-th item (golden-angle hue steps)."""
    hue = (i * 0.618033988749895) % 1.0  # the golden ratio spreads consecutive hues apart
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0))


def show_matching(image, out_path, patch_size=16, global_size=224, local_size=96, seed=0):
    """The method on one image: a teacher global and a student local view cut by the real
    augmentation, each matched pair outlined in the teacher patch's colour, unmatched student
    patches greyed; per-patch colours on top, per-view (DINO) below. Returns the pairs
    [(student patch, teacher patch)], and the views' box and flip."""
    seed %= 2 ** 64  # numpy wants seeds >= 0
    rng = np.random.default_rng(seed)
    glob, local, box, flip = pw.spatial_views(image.convert("RGB"), rng, global_size, local_size, 1)
    index, valid = pw.match_patches(box[0:1], flip[0:1], global_size, box[2:3], flip[2:3],
                                 local_size, patch_size)
    pairs = [(n, int(index[0, n])) for n in range(index.shape[1]) if valid[0, n]]
    gap, margin = 16, 8
    width = 2 * margin + global_size + gap + local_size
    canvas = Image.new("RGB", (width, 2 * margin + 2 * global_size + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for row, mode in enumerate(("patch", "view")):
        views = []
        for v, x in ((0, glob[0]), (2, local[0])):
            n_tiles = (x.shape[-1] // patch_size) ** 2 if mode == "patch" else 1
            tile, _ = pw.draw_photometric_params(np.random.default_rng((seed, row, v)),
                                              1, n_tiles, 0.0, 0.0)
            views.append(pw.color_jitter_tiles(x[None].float() / 255, tile)[0])  # (3, S, S) in [0, 1]
        teacher, student = (Image.fromarray((v.permute(1, 2, 0) * 255).round().byte().numpy())
                            for v in views)
        valid_grid = valid[0].view(local_size // patch_size, -1)
        grey = Image.new("RGB", student.size, (128, 128, 128))
        mask = Image.fromarray(grid_to_pixels(~valid_grid, patch_size).astype(np.uint8) * 170)
        student = Image.composite(grey, student, mask)  # greys the unmatched patches
        top = margin + row * (global_size + gap)
        origins = ((margin, top), (margin + global_size + gap, top))  # teacher, student
        for (ox, oy), img, size in zip(origins, (teacher, student), (global_size, local_size)):
            canvas.paste(img, (ox, oy))
            for k in range(0, size + 1, patch_size):  # the ViT patch grid
                draw.line([(ox + k, oy), (ox + k, oy + size)], fill=(255, 255, 255), width=1)
                draw.line([(ox, oy + k), (ox + size, oy + k)], fill=(255, 255, 255), width=1)
        for n, t in pairs:
            colour = pair_colour(t)
            for (ox, oy), (r, c) in zip(origins, (divmod(t, global_size // patch_size),
                                                  divmod(n, local_size // patch_size))):
                left, top = ox + c * patch_size, oy + r * patch_size
                draw.rectangle([left, top, left + patch_size - 1, top + patch_size - 1],
                               outline=colour, width=2)
    canvas.save(out_path)
    return pairs, box, flip


def last_selfattention(backbone, x):
    """The attention weights of a ViT's last block, (B, heads, 1 + N, 1 + N), each row summing to
    1: its softmax written out, where the ViT calls the fused kernel that keeps no weights."""
    x = backbone.prepare_tokens(x)
    for block in backbone.blocks[:-1]:
        x = block(x)
    last = backbone.blocks[-1]
    B, N, C = x.shape
    qkv = last.attn.qkv(last.norm1(x)).reshape(B, N, 3, last.attn.num_heads, -1)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, C/H)
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, N, N)


def show_attention(image, out_path, backbone, size=224, mass=0.6):
    """DINO's attention picture: for each head of the last block, the patches that hold `mass` of
    the CLS token's attention, over the image. Returns the CLS attention rows (heads, 1 + N)."""
    img = TF.resize(image.convert("RGB"), size, interpolation=TF.InterpolationMode.BICUBIC)
    img = TF.center_crop(img, size)
    x = pw.imagenet_normalize(TF.pil_to_tensor(img)[None].float() / 255)
    with torch.no_grad():
        # (heads, 1 + N): the CLS token's row
        attn = last_selfattention(backbone.eval(), x)[0, :, 0]
    g = size // backbone.patch_size
    cls_to_patch = attn[:, 1:] / attn[:, 1:].sum(1, keepdim=True)  # (heads, N)
    value, order = cls_to_patch.sort(dim=1, descending=True)
    keep_sorted = value.cumsum(1) - value < mass  # smallest set of patches holding `mass`
    # (heads, g, g)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted).view(-1, g, g)
    panels = [img]
    base = np.asarray(img).astype(np.float32)
    for h in range(len(keep)):
        m = grid_to_pixels(keep[h], backbone.patch_size)[..., None]
        heat = grid_to_pixels(cls_to_patch[h].view(g, g), backbone.patch_size)[..., None]
        heat = heat / heat.max()
        colour = np.array(pair_colour(h), dtype=np.float32)
        panel = np.where(m, 0.35 * base + 0.65 * colour * (0.4 + 0.6 * heat), 0.3 * base)
        panels.append(Image.fromarray(panel.clip(0, 255).astype(np.uint8)))
    side = size * max(1, 224 // size)  # small inputs are shown enlarged, pixels kept sharp
    canvas = Image.new("RGB", (len(panels) * (side + 4) - 4, side), "white")
    for i, p in enumerate(panels):
        canvas.paste(p.resize((side, side), Image.Resampling.NEAREST), (i * (side + 4), 0))
    canvas.save(out_path)
    return attn


def backbone_from_args(args):
    """The backbone of --pretrained, else the --checkpoint_key network of output_dir's checkpoint
    (a misfit to the flags: one line), and its path."""
    path = args.pretrained or os.path.join(args.output_dir, "checkpoint.pth")
    backbone = pw.encoder_from_args(args).backbone
    pw.load_backbone(backbone, pw.read_weights(path, args.trust_checkpoint), path,
                     args.checkpoint_key)
    return backbone, path


def evaluate(args):
    """patchwise's k-NN and linear probe of saved weights, on each rank under torchrun."""
    rank, world, device, log, amp_dtype = pw.start_run(args)
    with pw.agreed_errors(device):  # what one node may lack: the weights, the data
        backbone, path = backbone_from_args(args)
        datasets = pw.build_datasets(args.data, args.data_path, args.download,
                                     args.synthetic_size)
    return pw.evaluate_teacher(args, backbone.to(device), datasets, world, device,
                               f"teacher in {path}", True, amp_dtype, log)


def main(argv=None):
    p = pw.Parser(description="The evaluation of saved weights, pictures of PW-Self on an image, "
                              "the export of weights; every flag of patchwise.py may follow.",
                  add_help=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--eval", action="store_true", help="k-NN and linear probe of the teacher "
                      "in --output_dir, or of --pretrained weights, as at the end of training.")
    what.add_argument("--show_matching", metavar="IMAGE",
                      help="Draw a teacher and a student view of IMAGE and their matched patches.")
    what.add_argument("--show_attention", metavar="IMAGE",
                      help="Draw the teacher's CLS attention on IMAGE, one panel per head.")
    what.add_argument("--export_backbone", metavar="FILE",
                      help="Write the teacher backbone as DINO releases its backbones: the bare "
                           "ViT state dict, which DINO's and timm's ViT load with strict=True.")
    p.add_argument("--out", help="The PNG the pictures go to.")
    try:
        tool, rest = p.parse_known_args(argv)
        if tool.eval:  # patchwise's run, its one-line errors and torchrun's processes
            return pw.main(rest, run=evaluate)
        args = pw.resolve_args(rest)
        pw.check_args(args)
        for flag in ("show_matching", "show_attention", "out", "export_backbone"):  # all files
            pw.check_path(f"--{flag}", getattr(tool, flag), folder=False)
        if tool.export_backbone:
            backbone, path = backbone_from_args(args)
            torch.save(backbone.state_dict(), tool.export_backbone)
            print(f"wrote the teacher backbone of {path} to {tool.export_backbone}")
            return
        if not tool.out:
            raise pw.UserError("--show_matching and --show_attention need --out FILE.png")
        image_path = tool.show_matching or tool.show_attention
        try:
            image = pw.load_image(image_path)
        except pw.UNREADABLE as e:
            raise pw.UserError(f"cannot read the image {image_path} ({e})") from None
        # A photo gets DINO's ImageNet geometry unless the command line says otherwise: the
        # presets' 32 px views are for the demo's images. The model keeps its own patch size.
        imagenet = (("patch_size", 16), ("global_size", 224), ("local_size", 96))
        patch, glob, local = (getattr(args, k) if k in args.given else v for k, v in imagenet)
        if tool.show_matching:
            pairs, _, _ = show_matching(image, tool.out, patch, glob, local, args.seed)
            gs, gt = local // patch, glob // patch
            print(f"{len(pairs)} of {gs * gs} student patches matched: " + ", ".join(
                f"{divmod(n, gs)}->{divmod(t, gt)}" for n, t in pairs))
        else:
            backbone, _ = backbone_from_args(args)
            show_attention(image, tool.out, backbone, glob)
        print(f"wrote {tool.out}")
    except pw.UserError as e:
        print(f"patchwise_tools: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
