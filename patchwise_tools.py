#!/usr/bin/env python3
"""patchwise's tools for saved weights, beside patchwise.py as DINO's evaluation and visualisation
scripts are beside main_dino.py: the k-NN and linear probe of a teacher, copy detection and image
retrieval as DINO measures them, pictures of the method on an image, and the teacher's backbone in
DINO's released layout.

    python patchwise_tools.py --eval --output_dir output       # torchrun for several GPUs
    python patchwise_tools.py --copydays copydays [--distractors D] [--whitening W] --pretrained F
    python patchwise_tools.py --retrieval datasets --dataset roxford5k --output_dir output
    python patchwise_tools.py --make_copy_set copyset          # from the val images of --data
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
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

import patchwise as pw


def grid_to_pixels(grid, patch_size):
    """A (g, g) per-patch tensor as a (g p, g p) per-pixel numpy array, each patch a flat block."""
    return grid.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1).numpy()


def to_pil(x):
    """uint8 (3, H, W), as pw.load_image reads it, as a PIL RGB image."""
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def pair_colour(i):
    """A distinct, saturated colour for the i-th item (golden-angle hue steps)."""
    hue = (i * 0.618033988749895) % 1.0  # the golden ratio spreads consecutive hues apart
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0))


def show_matching(image, out_path, patch_size=16, global_size=224, local_size=96, seed=0):
    """The method on one image, uint8 (3, H, W): a teacher global and a student local view cut by
    the real augmentation, each matched pair outlined in the teacher patch's colour, unmatched
    student patches greyed; per-patch colours on top, per-view (DINO) below. Returns the pairs
    [(student patch, teacher patch)], and the views' box and flip."""
    seed %= 2 ** 64  # numpy wants seeds >= 0
    rng = np.random.default_rng(seed)
    glob, local, box, flip = pw.spatial_views(image, rng, global_size, local_size, 1)
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
    the CLS token's attention, over the image uint8 (3, H, W). Returns the CLS attention rows
    (heads, 1 + N)."""
    img = TF.center_crop(TF.resize(image, size, TF.InterpolationMode.BICUBIC, antialias=True), size)
    x = pw.imagenet_normalize(img[None].float() / 255)
    with torch.no_grad():
        # (heads, 1 + N): the CLS token's row
        attn = last_selfattention(backbone.eval(), x)[0, :, 0]
    g = size // backbone.patch_size
    cls_to_patch = attn[:, 1:] / attn[:, 1:].sum(1, keepdim=True)  # (heads, N)
    value, order = cls_to_patch.sort(dim=1, descending=True)
    keep_sorted = value.cumsum(1) - value < mass  # smallest set of patches holding `mass`
    # (heads, g, g)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted).view(-1, g, g)
    panels = [to_pil(img)]
    base = img.permute(1, 2, 0).numpy().astype(np.float32)
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


# ---- Downstream: copy detection (Copydays) and image retrieval (revisited Oxford and Paris) -----
# DINO's protocols (eval_copy_detection.py, eval_image_retrieval.py), which the public PW-Self code
# runs unchanged; ../shared/DOWNSTREAM.md in the repository's notes, docs/experiments.md here.

def average_precision(pos, n_positives):
    """The trapezoid AP of Holidays and revisitop: positives at sorted 0-based ranks pos (junk
    removed), of n_positives that exist; one positive at rank r > 0 scores 1 / (2 (r + 1))."""
    r = np.asarray(pos, dtype=np.float64)
    j = np.arange(len(r))  # positives seen before each
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1))  # precision just before the hit, after
    return float(((before + (j + 1) / (r + 1)) / 2).sum() / n_positives)


def compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """revisitop's mAP and mP@k: ranks (n_db, n_q) database indices best first per query; gnd[i]
    has 'ok' and optional 'junk' ids, junk left out of the ranking. A query without positives is
    NaN and leaves the means. Returns mAP, APs (n_q,), mP@k (len(kappas),), P@k (n_q, k)."""
    aps, prs = np.full(len(gnd), np.nan), np.full((len(gnd), len(kappas)), np.nan)
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=np.int64)
        if len(ok) == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[:, i], ok))
        junk = np.flatnonzero(np.isin(ranks[:, i], np.asarray(g.get("junk", []), dtype=np.int64)))
        pos = pos - np.searchsorted(junk, pos)  # each positive moves up past the junk above it
        aps[i] = average_precision(pos, len(ok))
        for j, k in enumerate(kappas):
            kq = min(pos.max() + 1, k)
            prs[i, j] = (pos + 1 <= kq).sum() / kq
    kept = ~np.isnan(aps)
    return (float(aps[kept].mean()) if kept.any() else float("nan"), aps,
            prs[kept].mean(0) if kept.any() else np.full(len(kappas), np.nan), prs)


def image_files(folder, what):
    """The images of a flat folder, sorted (ImageFolder's extensions); one line if none, absent."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not os.path.isdir(folder):
        raise pw.UserError(f"{what} {folder} is not a folder")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))
    if not names:
        raise pw.UserError(f"no images in {what} {folder}")
    return [os.path.join(folder, f) for f in names]


class SquareImages(torch.utils.data.Dataset):
    """Images resized to a square side, bicubic, aspect not kept (DINO's copy detection): uint8 (3,
    S, S) and the error of an unreadable file ('' if read), at module level for spawned workers."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = pw.load_image(self.paths[i])[None]  # PIL's antialiased bicubic, in torch
            return F.interpolate(img, (self.size,) * 2, mode="bicubic", antialias=True)[0], ""
        except pw.UNREADABLE as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{self.paths[i]} ({e})"


@torch.no_grad()
def copy_detection_features(backbone, paths, size, device, features="cls_gem", num_workers=0,
                            batch_size=64):
    """DINO's copy-detection features of image files, float32 (N, F): [CLS, GeM] (the GeM, p = 4,
    of the final-norm patch tokens clamped at 1e-6: 2 D), the CLS alone, or the pixels (3 S^2)."""
    loader = torch.utils.data.DataLoader(SquareImages(paths, size), batch_size=batch_size,
                                         num_workers=num_workers)
    report, out, failed = pw.progress_reporter(print, "features", len(paths), "images"), [], []
    for x, errors in loader:
        failed += [e for e in errors if e]
        x = pw.imagenet_normalize(x.to(device).float() / 255)  # float32, as DINO extracts
        if features == "pixels":
            out.append(x.flatten(1).cpu())
        else:
            tokens = backbone(x)  # (B, 1 + N, D) after the final norm
            gem = tokens[:, 1:].clamp(min=1e-6).pow(4).mean(1).pow(1 / 4)  # (B, D)
            f = tokens[:, 0] if features == "cls" else torch.cat([tokens[:, 0], gem], 1)  # (B, F)
            out.append(f.cpu())
        report(sum(len(o) for o in out))
    if failed:
        raise pw.UserError(f"cannot read {len(failed)} image(s), such as {failed[0]}; remove or "
                           "replace them")
    return torch.cat(out)


def learn_whitening(features, floor=1e-5):
    """DINO's PCA whitening from its own features (N, F): the mean mu, and P = diag(d^-1/2) V^T from
    the eigen-decomposition of the uncentred F^T F / N (as DINO's code), eigenvalues floored at
    floor x the largest, all directions kept. Apply as (x - mu) @ P.T."""
    f = features.double()
    d, V = torch.linalg.eigh(f.T @ f / len(f))
    d = d.clamp(min=floor * d.max())
    return features.mean(0), (V * d.rsqrt()).T.float()


def copydays_blocks(root):
    """Copydays' query blocks present under root: {name: (files, positive original index per
    query)}, and the originals. strong: a copy's original has its first 4 characters; jpegqual/
    and crops/ levels: by sorted position. One line for a folder that breaks the layout."""
    def jpgs(folder):  # DINO reads a block's .jpg files, sorted
        if not os.path.isdir(folder):
            return []
        return sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
    originals = jpgs(os.path.join(root, "original"))
    if not originals:
        raise pw.UserError(f"no original/*.jpg in --copydays {root}; it takes Copydays' folder "
                           "(original/, strong/, optionally jpegqual/ and crops/)")
    blocks, skipped = {"original": (originals, list(range(len(originals))))}, []
    prefix = {name[:4]: i for i, name in enumerate(originals)}
    names = ["strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)] + [
        f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)]
    for name in names:
        folder = os.path.join(root, name)
        files = jpgs(folder)
        if not files:
            skipped.append(name)
        elif name == "strong":
            lost = [f for f in files if f[:4] not in prefix]
            if lost:
                raise pw.UserError(f"{folder}/{lost[0]} has no original {lost[0][:4]}00.jpg in "
                                   f"{root}/original ({len(lost)} such copies)")
            blocks[name] = (files, [prefix[f[:4]] for f in files])
        elif len(files) != len(originals):
            raise pw.UserError(f"{folder} has {len(files)} images, original/ {len(originals)}: its "
                               "copies match the originals by sorted position")
        else:
            blocks[name] = (files, list(range(len(files))))
    return originals, blocks, skipped


def copy_detection(backbone, root, size, device, distractors=None, whitening=None,
                   features="cls_gem", num_workers=0, k=20):
    """Copydays, as DINO: the originals (then any distractors: never positives) are the database,
    every block present queries it; cosine top-k, the trapezoid AP of each query's one positive.
    Returns {block: mAP in %}."""
    originals, blocks, skipped = copydays_blocks(root)  # every folder read before any feature
    distractors = image_files(distractors, "--distractors") if distractors else []
    whitening = image_files(whitening, "--whitening") if whitening else []
    if skipped:
        print(f"copy detection: {len(skipped)} Copydays blocks absent, skipped: "
              f"{', '.join(skipped)}")
    extract = lambda paths: copy_detection_features(backbone, paths, size, device,  # noqa: E731
                                                     features, num_workers)
    db = extract([os.path.join(root, "original", f) for f in originals] + distractors)
    if whitening and db.shape[1] > 16384:  # its (F, F) matrices
        raise pw.UserError(f"--whitening of {db.shape[1]} features is too large; lower --imsize")
    queries = {name: db[:len(originals)] if name == "original" else
               extract([os.path.join(root, name, f) for f in files])
               for name, (files, _) in blocks.items()}
    if whitening:
        mu, P = learn_whitening(extract(whitening))
        db, queries = (db - mu) @ P.T, {n: (q - mu) @ P.T for n, q in queries.items()}
    db = F.normalize(db, dim=1)
    results = {}
    for name, (files, positive) in blocks.items():
        sim = F.normalize(queries[name], dim=1) @ db.T  # (n_q, n_db)
        top = sim.topk(min(k, len(db)), dim=1).indices.numpy()  # (n_q, k)
        aps = [average_precision(np.flatnonzero(row == p), 1) for row, p in zip(top, positive)]
        results[name] = 100 * float(np.mean(aps))
        print(f"eval on {name} mAP={results[name] / 100:.3f} ({len(files)} queries)")
    return results


def read_revisited(root, dataset):
    """revisitop's ground truth root/dataset/gnd_dataset.pkl: the database and query image paths
    (jpg/<name>.jpg) and gnd (per query: bbx, easy, hard, junk); one line for what is missing."""
    import pickle
    gnd_path = os.path.join(root, dataset, f"gnd_{dataset}.pkl")
    if not os.path.isfile(gnd_path):
        raise pw.UserError(f"{gnd_path} does not exist; --retrieval takes the folder holding "
                           f"{dataset}/gnd_{dataset}.pkl and {dataset}/jpg/ (revisitop's layout)")
    with open(gnd_path, "rb") as f:
        cfg = pickle.load(f)
    paths = [[os.path.join(root, dataset, "jpg", f"{name}.jpg") for name in cfg[key]]
             for key in ("imlist", "qimlist")]
    missing = [p for p in paths[0] + paths[1] if not os.path.isfile(p)]
    if missing:
        raise pw.UserError(f"{len(missing)} images of {gnd_path} are missing, such as {missing[0]}")
    return paths[0], paths[1], cfg["gnd"]


@torch.no_grad()
def retrieval_feature(backbone, path, size, device, multiscale=False, bbx=None):
    """DINO's retrieval feature of one image: thumbnail to size (LANCZOS, aspect kept, never
    enlarged), the CLS token, the mean over scales 1, 1/sqrt 2, 1/2 if multiscale, L2-normalised
    (D,). bbx (x1, y1, x2, y2): revisitop's query crop, scaled by the whole image's factor."""
    try:
        img = to_pil(pw.load_image(path))
    except pw.UNREADABLE as e:
        raise pw.UserError(f"cannot read the image {path} ({e})") from None
    if bbx is None:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)  # DINO's Image.ANTIALIAS: LANCZOS
    else:
        factor = min(1.0, size / max(img.size))
        img = img.crop(tuple(round(v) for v in bbx))
        img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))),
                         Image.Resampling.LANCZOS)
    x = pw.imagenet_normalize(TF.pil_to_tensor(img)[None].to(device).float() / 255)
    scales = (1, 2 ** -0.5, 0.5) if multiscale else (1,)
    v = sum(backbone(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                                    align_corners=False))[0, 0] for s in scales)
    return F.normalize(v / len(scales), dim=0).cpu()


def image_retrieval(backbone, root, dataset, size, device, multiscale=False, query_crop=False):
    """Revisited Oxford or Paris as DINO runs it: every query ranks the whole database by cosine
    similarity; mAP and mP@1, 5, 10 in % under the Easy, Medium and Hard protocols."""
    db_paths, q_paths, gnd = read_revisited(root, dataset)
    report = pw.progress_reporter(print, "features", len(db_paths) + len(q_paths), "images")
    feats = []
    for i, path in enumerate(db_paths + q_paths):
        q = i - len(db_paths)
        bbx = gnd[q]["bbx"] if query_crop and q >= 0 else None
        feats.append(retrieval_feature(backbone, path, size, device, multiscale, bbx))
        report(i + 1)
    feats = torch.stack(feats)  # (n_db + n_q, D)
    sim = feats[:len(db_paths)] @ feats[len(db_paths):].T  # (n_db, n_q)
    ranks = torch.argsort(-sim, dim=0).numpy()

    def ids(g, keys):  # a query's ids of those kinds
        return np.concatenate([np.asarray(g[k], dtype=np.int64) for k in keys])
    results = {}
    for name, ok, junk in (("E", ("easy",), ("junk", "hard")), ("M", ("easy", "hard"), ("junk",)),
                           ("H", ("hard",), ("junk", "easy"))):  # revisitop's protocols
        m, _, mp, _ = compute_map(ranks, [dict(ok=ids(g, ok), junk=ids(g, junk)) for g in gnd])
        results[f"map_{name}"], results[f"mp_{name}"] = 100 * m, (100 * mp).round(2).tolist()
    queries = "cropped to their bbx" if query_crop else "whole (as DINO)"
    print(f">> {dataset}: imsize {size}, {'multi-scale' if multiscale else 'one scale'}, queries "
          f"{queries}, {len(db_paths)} database images, {len(q_paths)} queries")
    print(f">> {dataset}: mAP E: {results['map_E']:.2f}, M: {results['map_M']:.2f}, H: "
          f"{results['map_H']:.2f}")
    print(f">> {dataset}: mP@k[1 5 10] M: {results['mp_M']}, H: {results['mp_H']}")
    return results


def make_copy_set(base, out, seed=0, n_originals=157, copies=2, area=(1 / 3, 2 / 3),
                  quality=(10, 30)):
    """A copy-detection set in Copydays' layout from base, a dataset of (uint8 (3, H, W), label)
    read one image at a time (an unreadable one named and left out): n_originals images (at most
    half) as originals/, `copies` strong copies of each in strong/, the rest as distractors/, from
    seed. A strong copy: a crop of `area` (a third to two thirds; aspect 3/4 to 4/3) resized
    back, colour jitter (brightness, contrast, saturation x 0.6-1.4, hue +-0.1), a blur of sigma
    1-2% of the shorter side, a JPEG re-encode at `quality` (10-30): Copydays' strong attacks are
    crops, colour and print-scan changes, blur and compression together, each at its scale.
    Returns the counts of originals, copies and distractors."""
    from PIL import ImageFilter
    rng = np.random.default_rng(seed % 2 ** 64)
    n = min(n_originals, len(base) // 2)
    for sub in ("copydays/original", "copydays/strong", "distractors"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    written = 0  # originals, then distractors
    for index in rng.permutation(len(base)):
        sample = pw.read_sample(base, int(index))
        if sample is None:
            continue
        img, i = to_pil(sample[0]), written
        written += 1
        if i >= n:
            img.save(os.path.join(out, "distractors", f"{i - n:06d}.jpg"), quality=95)
            continue
        img.save(os.path.join(out, "copydays/original", f"{1000 + i:04d}00.jpg"), quality=95)
        for c in range(1, copies + 1):
            r = np.random.default_rng((seed % 2 ** 64, i, c))
            top, left, h, w = pw.sample_crop_box(r, img.height, img.width, area)
            copy = img.resize(img.size, Image.Resampling.BICUBIC,
                              box=(left, top, left + w, top + h))
            for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
                copy = adjust(copy, r.uniform(0.6, 1.4))
            copy = TF.adjust_hue(copy, r.uniform(-0.1, 0.1))
            copy = copy.filter(ImageFilter.GaussianBlur(r.uniform(0.01, 0.02) * min(img.size)))
            copy.save(os.path.join(out, "copydays/strong", f"{1000 + i:04d}{c:02d}.jpg"),
                      quality=int(r.integers(quality[0], quality[1] + 1)))
    return min(n, written), min(n, written) * copies, max(0, written - n)


def backbone_from_args(args, random_init=False):
    """The backbone of --pretrained, else the --checkpoint_key network of output_dir's checkpoint
    (a misfit to the flags: one line), and its path; random_init: the teacher a run of --seed
    starts from (build_models' first draws), a baseline."""
    if random_init:
        torch.manual_seed(args.seed)
        return pw.encoder_from_args(args).backbone, f"the random init of --seed {args.seed}"
    path = args.pretrained or os.path.join(args.output_dir, "checkpoint.pth")
    backbone = pw.encoder_from_args(args).backbone
    pw.load_backbone(backbone, pw.read_weights(path, args.trust_checkpoint), path,
                     args.checkpoint_key)
    return backbone, path


def evaluate(args):
    """patchwise's k-NN and linear probe of saved weights, on each rank under torchrun."""
    rank, world, device, log, _ = pw.start_run(args)
    with pw.agreed_errors(device):  # what one node may lack: the weights, the data
        backbone, path = backbone_from_args(args)
        datasets = pw.build_datasets(args.data, args.data_path, args.download,
                                     args.synthetic_size)
    return pw.evaluate_teacher(args, backbone.to(device), datasets, world, device,
                               f"teacher in {path}", True, log)


def main(argv=None):
    p = pw.Parser(description="The evaluation of saved weights, pictures of PW-Self on an image, "
                              "the export of weights; every flag of patchwise.py may follow.",
                  add_help=True, allow_abbrev=False)  # --data is patchwise.py's, not --dataset
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--eval", action="store_true", help="k-NN and linear probe of the teacher "
                      "in --output_dir, or of --pretrained weights, as at the end of training.")
    what.add_argument("--show_matching", metavar="IMAGE",
                      help="Draw a teacher and a student view of IMAGE and their matched patches.")
    what.add_argument("--show_attention", metavar="IMAGE",
                      help="Draw the teacher's CLS attention on IMAGE, one panel per head.")
    what.add_argument("--copydays", metavar="DIR", help="Copy detection on Copydays (DINO's "
                      "protocol): DIR holds original/ and strong/ (and jpegqual/, crops/).")
    what.add_argument("--retrieval", metavar="DIR", help="Image retrieval on revisited Oxford or "
                      "Paris (DINO's protocol): DIR holds D/gnd_D.pkl and D/jpg/, D: --dataset.")
    what.add_argument("--make_copy_set", metavar="DIR", help="Write a copy-detection set in "
                      "Copydays' layout to DIR from the val images of --data (and --data_path).")
    what.add_argument("--export_backbone", metavar="FILE",
                      help="Write the teacher backbone as DINO releases its backbones: the bare "
                           "ViT state dict, which DINO's and timm's ViT load with strict=True.")
    p.add_argument("--out", help="The PNG the pictures go to.")
    d = p.add_argument_group("copy detection and retrieval")
    d.add_argument("--imsize", type=pw.SIDE, help="Side the images are resized to (copy "
                   "detection: square; retrieval: the longer side); default: --global_size.")
    d.add_argument("--distractors", metavar="DIR", help="Copy detection: images added to the "
                   "database, never positives.")
    d.add_argument("--whitening", metavar="DIR", help="Copy detection: images to learn the "
                   "whitening on (none: no whitening).")
    d.add_argument("--features", default="cls_gem", choices=("cls_gem", "cls", "pixels"),
                   help="Copy detection: DINO's CLS with the GeM of the patch tokens, the CLS "
                        "alone, or the resized pixels (a baseline without a model).")
    d.add_argument("--dataset", default="roxford5k", choices=("roxford5k", "rparis6k"),
                   help="Retrieval: revisited Oxford or Paris.")
    d.add_argument("--multiscale", action="store_true", help="Retrieval: the mean feature over "
                   "scales 1, 1/sqrt 2, 1/2 (DINO: on for Paris at 512, off for Oxford at 224).")
    d.add_argument("--query_crop", action="store_true", help="Retrieval: crop each query to its "
                   "bbx first (revisitop's protocol; DINO feeds the whole query image).")
    d.add_argument("--random_init", action="store_true", help="Evaluate the randomly initialised "
                   "backbone of --seed, a baseline, instead of saved weights.")
    try:
        tool, rest = p.parse_known_args(argv)
        if tool.eval:  # patchwise's run, its one-line errors and torchrun's processes
            return pw.main(rest, run=evaluate)
        args = pw.resolve_args(rest)
        pw.check_args(args)
        for flag in ("show_matching", "show_attention", "out", "export_backbone"):  # all files
            pw.check_path(f"--{flag}", getattr(tool, flag), folder=False)
        for flag in ("copydays", "retrieval"):  # (--distractors, --whitening: image_files)
            path = getattr(tool, flag)
            if path and not os.path.isdir(path):
                raise pw.UserError(f"--{flag} {path} is not a folder")
        if tool.copydays or tool.retrieval:
            backbone, path = backbone_from_args(args, tool.random_init or tool.features == "pixels")
            backbone = backbone.to(args.device).eval()
            size = tool.imsize or args.global_size
            print(f"{'copy detection' if tool.copydays else 'image retrieval'} with {path}: "
                  f"{args.arch}/{args.patch_size}, imsize {size}, {args.device}"
                  + (f", features {tool.features}" if tool.copydays else ""))
            if tool.copydays:
                return copy_detection(backbone, tool.copydays, size, args.device, tool.distractors,
                                      tool.whitening, tool.features, args.num_workers)
            return image_retrieval(backbone, tool.retrieval, tool.dataset, size, args.device,
                                   tool.multiscale, tool.query_crop)
        if tool.make_copy_set:
            val = pw.build_datasets(args.data, args.data_path, args.download,
                                    args.synthetic_size)[1]
            n, copies, rest = make_copy_set(val, tool.make_copy_set, args.seed)
            print(f"wrote {n} originals, {copies} strong copies, {rest} distractors from the val "
                  f"images of --data {args.data} to {tool.make_copy_set}; evaluate with --copydays "
                  f"{os.path.join(tool.make_copy_set, 'copydays')} --distractors "
                  f"{os.path.join(tool.make_copy_set, 'distractors')}")
            return n, copies, rest
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
