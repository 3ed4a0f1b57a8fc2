#!/usr/bin/env python3
"""Benchmark of patchwise: what the patch level costs over DINO, measured side by side in one run.

    python bench_patchwise.py                 # CPU: ViT-tiny at 32/16 px, about 2 minutes on 2 cores
    python bench_patchwise.py --device cuda   # GPU: ViT-S/16 and ViT-B/16 at 224/96, K = 8192

Prints a table and writes it as JSON (--out). Every time is a median over --repeats runs after
warm-up, the compared variants timed in turn; more repeats give steadier medians. Each section
announces itself before it runs and says how long it took. Sections:
  1. data workers: samples/s of one worker process (one thread) making training samples from an
     ImageNet-size JPEG on disk, against a DINO-style PIL pipeline (colour work included) on the
     same file; its decode and resampling apart (the floor), the views' PSNR against PIL's bicubic,
     the evaluation input's images/s, and the workers a GPU needs: on a GPU from the measured step
     (section 2), on a CPU from the FLOPs at 30% of an H100's bf16 peak (arithmetic, so labelled);
  2. training step (teacher + student forward, loss, backward, AdamW, EMA) on a batch already on
     the device, for DINO, PW-Self with coordinate matching and PW-Self with similarity matching:
     time, images/s, peak memory, MFU, and the ratios to DINO beside the analytic FLOP ratio;
     on a CPU, also the peak memory (process RSS) of a float32 ViT-S/16 step at the GPU sizes;
  3. matching alone: by coordinates (ours), by the crops' intersection (the PW-Self code's rule)
     and by argmax-cosine similarity, all pairs of a step as train_step calls them.
"""
import argparse
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

import patchwise as pw

# Dense bf16 peak of the devices we know, in FLOP/s, for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def interleaved_medians(fns, repeats, warmup=2, sync=lambda: None):
    """Median seconds of each function of fns (a dict), timed in turn, one call of each per round,
    so that a slow drift of the machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def imagenet_size_jpeg():
    """A 500x375 JPEG (ImageNet's typical size) from the CC0 photo in figures/, as bytes."""
    here = os.path.dirname(os.path.abspath(__file__))
    img = Image.open(os.path.join(here, "figures", "chelsea.png")).convert("RGB").resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def dino_reference_sample(path, global_size, local_size, n_local):
    """DINO's DataAugmentationDINO on PIL images, written out: crop, flip, colour jitter, grayscale,
    blur, solarization, to tensor, normalise, for every view."""
    import torchvision.transforms as T
    flip_jitter = T.Compose([T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                             T.RandomGrayscale(p=0.2)])
    finish = T.Compose([T.ToTensor(), T.Normalize(pw.IMAGENET_MEAN, pw.IMAGENET_STD)])

    def blur(img, p):
        return img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0))) if np.random.rand() < p else img

    img = Image.open(path).convert("RGB")
    g = T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    l = T.RandomResizedCrop(local_size, scale=(0.05, 0.4), interpolation=T.InterpolationMode.BICUBIC)
    views = [finish(blur(flip_jitter(g(img)), 1.0))]
    v2 = blur(flip_jitter(g(img)), 0.1)
    views.append(finish(ImageOps.solarize(v2) if np.random.rand() < 0.2 else v2))
    views += [finish(blur(flip_jitter(l(img)), 0.5)) for _ in range(n_local)]
    return views


def bench_workers(repeats, global_size=224, local_size=96, n_local=8, patch_size=16):
    """One data worker (one thread, as DataLoader's) on an ImageNet-size JPEG read from disk, in
    seconds: patchwise's training sample, its parts (decode; the ten views alone), its evaluation
    input, DINO's PIL pipeline; and the views' PSNR against PIL's bicubic on the same boxes."""
    import torchvision.transforms.functional as TF
    path = os.path.join(tempfile.mkdtemp(), "imagenet_size.jpg")
    with open(path, "wb") as f:
        f.write(imagenet_size_jpeg())

    class OneFile:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return pw.load_image(path), 0

    ours, evaluation, img = pw.MultiViewDataset(OneFile(), 0, global_size, local_size, n_local, patch_size), \
        pw.EvalDataset(OneFile(), global_size), pw.load_image(path)
    rng, threads, n = np.random.default_rng(0), torch.get_num_threads(), 20
    torch.set_num_threads(1)
    t = interleaved_medians({"ours": lambda: [ours[(e, 0)] for e in range(n)],
                             "decode": lambda: [pw.load_image(path) for _ in range(n)],
                             "views": lambda: [pw.spatial_views(img, rng, global_size, local_size, n_local)
                                               for _ in range(n)],
                             "eval": lambda: [evaluation[0] for _ in range(n)],
                             "reference": lambda: [dino_reference_sample(path, global_size, local_size, n_local)
                                                   for _ in range(n)]}, repeats)
    torch.set_num_threads(threads)
    pil, squared, count = Image.open(path).convert("RGB"), 0.0, 0
    for seed in range(20):  # DINO's RandomResizedCrop on PIL: crop, then PIL's bicubic
        glob, local, box, flip = pw.spatial_views(img, np.random.default_rng(seed), global_size, local_size, n_local)
        for view, (top, left, h, w), f in zip([*glob, *local], box.int().tolist(), flip.tolist()):
            ref = TF.pil_to_tensor(TF.resized_crop(pil, top, left, h, w, [view.shape[-1]] * 2,
                                                   TF.InterpolationMode.BICUBIC))
            squared += ((view.float() - (ref.flip(-1) if f else ref).float()) ** 2).sum().item()
            count += view.numel()
    os.remove(path)
    os.rmdir(os.path.dirname(path))
    return {"ours_img_s": n / t["ours"], "dino_reference_img_s": n / t["reference"],
            "speedup": t["reference"] / t["ours"], "decode_ms": 1e3 * t["decode"] / n,
            "views_ms": 1e3 * t["views"] / n, "sample_ms": 1e3 * t["ours"] / n, "eval_img_s": n / t["eval"],
            "psnr_db": 10 * math.log10(255 ** 2 / (squared / count))}


def step_flops(arch_dim, depth, patch, sizes_student, sizes_teacher, head, K, tokens, sim_pairs=()):
    """Model FLOPs of one training step per image: 2 per multiply-add; student forward + backward
    (3x forward), teacher forward. Linear layers, attention matmuls and the head; norms and
    element-wise work are not counted (the usual MFU convention). tokens: (student, teacher)
    tokens per image that go through the head."""
    D, (hidden, bottleneck) = arch_dim, head

    def backbone(S):
        N = 1 + (S // patch) ** 2  # tokens, CLS included
        return (N - 1) * 2 * 3 * patch * patch * D + N * depth * (24 * D * D + 4 * N * D)

    per_token = 2 * (D * hidden + hidden * hidden + hidden * bottleneck + bottleneck * K)
    student = sum(backbone(S) for S in sizes_student) + tokens[0] * per_token
    teacher = sum(backbone(S) for S in sizes_teacher) + tokens[1] * per_token
    similarity = sum(2 * (s // patch) ** 2 * (t // patch) ** 2 * D for s, t in sim_pairs)
    return 3 * student + teacher + similarity


def head_tokens(sizes, patch, patches):
    """Tokens per image that go through the student and teacher heads in train_step: every token
    of every view (the teacher's: the 2 globals), or only the CLS tokens for plain DINO."""
    n_tokens = [1 + (s // patch) ** 2 if patches else 1 for s in sizes]
    return sum(n_tokens), sum(n_tokens[:2])


def host_syncs(step):
    """Where one call of step() makes the host wait for the GPU, as 'file:line' of the Python line
    that asked for it, from torch's sync debug mode (which does not see every kind of sync)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


# The compared variants: patch loss weight, photometric mode, matching.
VARIANTS = {"dino": (0.0, "view", "coords"), "pwself": (1.0, "patch", "coords"),
            "pwself_similarity": (1.0, "patch", "similarity")}


def build_variant(name, device, arch, depth, patch, global_size, local_size, n_local, K, head, batch, amp):
    """One variant's training step on a fixed batch of synthetic images, with its models on the
    device. Returns step(), resident_bytes() and the batch; the geometry stays on the host, as the
    loader delivers it."""
    weight, photometric, matching = VARIANTS[name]
    train, _, _ = pw.build_datasets("synthetic", "", synthetic_size=(batch, 10))
    ds = pw.MultiViewDataset(train, 0, global_size, local_size, n_local, patch, photometric)
    collated = torch.utils.data.default_collate([ds[(0, i)] for i in range(batch)])
    collated = {k: v if k in ("box", "flip") else v.to(device) for k, v in collated.items()}
    torch.manual_seed(0)
    student = pw.build_encoder(arch, patch, K, 0.1, depth, global_size, *head).to(device)
    teacher = pw.build_encoder(arch, patch, K, 0.0, depth, global_size, *head).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = pw.PWSelfLoss(K, patch_loss_weight=weight).to(device)
    opt = torch.optim.AdamW(pw.param_groups(student), fused=device.type == "cuda")

    def step():
        pw.train_step(student, teacher, loss_fn, opt, collated, epoch=0, lr=1e-4, wd=0.04, momentum=0.996,
                      patch_size=patch, matching=matching, amp_dtype=amp)

    def resident_bytes():
        """What this variant keeps on the device between steps: weights, gradients, optimizer state, batch."""
        tensors = [*student.parameters(), *teacher.parameters(), *loss_fn.buffers(),
                   *(p.grad for p in student.parameters() if p.grad is not None),
                   *(s for state in opt.state.values() for s in state.values() if torch.is_tensor(s)),
                   *(v for v in collated.values() if v.device.type == "cuda")]
        return sum(t.numel() * t.element_size() for t in tensors)
    return step, resident_bytes, collated


def bench_step(device, arch, depth, patch, global_size, local_size, n_local, K, head, batch, repeats):
    """Step time, FLOPs, MFU and (on CUDA) peak memory of DINO, PW-Self and PW-Self with similarity
    matching, built side by side and timed in turn (interleaved_medians)."""
    sizes_student, sizes_teacher = [global_size] * 2 + [local_size] * n_local, [global_size] * 2
    sim_pairs = [(s, global_size) for i in range(2) for v, s in enumerate(sizes_student) if v != i]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    variants = {name: build_variant(name, device, arch, depth, patch, global_size, local_size, n_local, K, head,
                                    batch, torch.bfloat16 if cuda else None) for name in VARIANTS}
    times = interleaved_medians({name: step for name, (step, _, _) in variants.items()}, repeats, warmup=3, sync=sync)
    results = {}
    for name, (step, resident_bytes, collated) in variants.items():
        weight, _, matching = VARIANTS[name]
        tokens = head_tokens(sizes_student, patch, weight > 0)
        flops = batch * step_flops(pw.VIT_SIZES[arch][0], depth, patch, sizes_student, sizes_teacher, head, K, tokens,
                                   sim_pairs if matching == "similarity" else ())
        results[name] = dict(flops=flops, head_tokens_per_image=tokens, peak_mem_gib=None, step_s=times[name],
                             img_s=batch / times[name])
        if cuda:
            # The other variants' models are resident too: this step's peak is what it adds on top
            # of everything resident, plus its own resident part.
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            own = resident_bytes()
            step()
            sync()
            results[name]["peak_mem_gib"] = (own + torch.cuda.max_memory_allocated() - before) / 2 ** 30
            results[name]["host_syncs"] = host_syncs(step)
    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), None)
    for r in results.values():
        r["mfu"] = r["flops"] / r["step_s"] / peak if peak else None
    for name in ("pwself", "pwself_similarity"):
        results[name]["time_ratio_to_dino"] = results[name]["step_s"] / results["dino"]["step_s"]
        results[name]["flop_ratio_to_dino"] = results[name]["flops"] / results["dino"]["flops"]
        if results["dino"]["peak_mem_gib"]:
            results[name]["mem_ratio_to_dino"] = results[name]["peak_mem_gib"] / results["dino"]["peak_mem_gib"]
    return results


def step_memory_child(variant, batch):
    """Run in a fresh process by bench_step_memory: two float32 training steps of ViT-S/16 at 224/96
    px, K 8192, on the CPU (its bf16 autocast ran 8x slower than float32 on a 2-core VM); prints the
    process's RSS before the first step and at its peak, in MiB, as JSON."""
    import resource
    step, _, _ = build_variant(variant, torch.device("cpu"), "vit_small", 12, 16, 224, 96, 8, 8192, (2048, 256), batch,
                               None)
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    for _ in range(2):
        step()
    print(json.dumps({"before_mib": before, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_step_memory(batch=8):
    """Peak memory of a ViT-S/16 step on a CPU, which has no peak-memory counter: the peak RSS of a
    fresh process, with glibc returning every large free to the OS so that RSS follows the live
    tensors. Linux only."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = {}
    for variant in ("dino", "pwself"):
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--step_memory_child", variant, str(batch)],
                             env=env, capture_output=True, text=True, check=True)
        out[variant] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def bench_matching(device, batch, global_size, local_size, patch, dim, n_local, repeats):
    """All view pairs of one training step, matched as train_step matches them (match_views, one
    call a student resolution): by coordinates, by the crops' intersection, by similarity."""
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    V, sizes = 2 + n_local, [global_size] * 2 + [local_size] * n_local
    box = (torch.rand(batch, V, 4, generator=g) * 100 + 1).to(device)
    flip = (torch.rand(batch, V, generator=g) < 0.5).to(device)
    feats = [torch.randn(batch, (s // patch) ** 2, dim, generator=g).to(device) for s in sizes]
    t = interleaved_medians({rule: lambda rule=rule: pw.match_views(box, flip, sizes, patch, 2, rule=rule)
                             for rule in ("coords", "intersection")} |
                            {"similarity": lambda: pw.match_views(None, None, sizes, patch, 2, feats[:2], feats)},
                            repeats, sync=sync)
    return {"coords_ms": 1e3 * t["coords"], "intersection_ms": 1e3 * t["intersection"],
            "similarity_ms": 1e3 * t["similarity"], "similarity_over_coords": t["similarity"] / t["coords"]}


def section(title):
    """Print a section's heading before its work starts, so a slow machine shows where it is;
    returns a function that prints how long the section took."""
    print(f"\n{title}", flush=True)
    start = time.perf_counter()
    return lambda: print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--step_memory_child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5,
                   help="Timed rounds of each measurement; more give steadier medians and take longer.")
    p.add_argument("--gpu_batch", type=int, default=128, help="Per-step batch of the GPU configurations.")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args()
    if args.step_memory_child:
        return step_memory_child(args.step_memory_child[0], int(args.step_memory_child[1]))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    begin = time.perf_counter()
    report = {"device": name, "torch": torch.__version__}
    print(f"device: {name}, torch {torch.__version__}")

    done = section("1. data worker, one process, 2x224 + 8x96 views from a 500x375 JPEG:")
    w = bench_workers(args.repeats)
    report["workers"] = w
    print(f"   patchwise {w['ours_img_s']:.1f} img/s, DINO-style PIL pipeline {w['dino_reference_img_s']:.1f} "
          f"img/s ({w['speedup']:.2f}x); a sample {w['sample_ms']:.2f} ms, of which, timed alone, the decode "
          f"{w['decode_ms']:.2f} ms and the ten views {w['views_ms']:.2f} ms")
    print(f"   views against PIL's bicubic on the same boxes: PSNR {w['psnr_db']:.1f} dB; evaluation input "
          f"(resize to {round(224 / 0.875)}, centre crop 224): {w['eval_img_s']:.0f} img/s")
    per_image = step_flops(384, 12, 16, [224] * 2 + [96] * 8, [224] * 2, (2048, 256), 8192,
                           head_tokens([224] * 2 + [96] * 8, 16, True))
    h100 = 0.3 * PEAK_BF16["H100"] / per_image
    report["workers"]["h100_30pct_img_s"] = h100
    print(f"   arithmetic, not a measurement: a ViT-S/16 PW-Self step (K 8192) at 30% of an H100's bf16 peak "
          f"is {h100:.0f} img/s ({per_image / 1e9:.0f} GFLOPs an image), fed by {h100 / w['ours_img_s']:.1f} such "
          f"workers")
    done()

    if device.type == "cuda":
        configs = [("vit_small", 12, 16, 224, 96, 8, 8192, (2048, 256), args.gpu_batch),
                   ("vit_base", 12, 16, 224, 96, 8, 8192, (2048, 256), args.gpu_batch)]
    else:
        configs = [("vit_tiny", 12, 4, 32, 16, 6, 1024, (512, 128), 16)]
    report["steps"] = {}
    for arch, depth, patch, sg, sl, nl, K, head, batch in configs:
        key = f"{arch}/{patch} {sg}/{sl}x{nl} K={K} batch {batch}"
        done = section(f"2. training step, {key}:")
        r = bench_step(device, arch, depth, patch, sg, sl, nl, K, head, batch, args.repeats)
        report["steps"][key] = r
        print(f"   {'':18} {'step ms':>9} {'img/s':>8} {'peak GiB':>9} {'MFU':>6} {'time/DINO':>10} {'FLOPs/DINO':>11} "
              f"{'mem/DINO':>9} {'head tokens/img (student, teacher)':>36}")
        for n, v in r.items():
            fmt = lambda x, f: format(x, f) if x is not None else "n/a"  # noqa: E731
            print(f"   {n:18} {1e3 * v['step_s']:9.1f} {v['img_s']:8.1f} {fmt(v['peak_mem_gib'], '9.2f'):>9} "
                  f"{fmt(v['mfu'] and 100 * v['mfu'], '5.1f'):>5}% {fmt(v.get('time_ratio_to_dino', 1.0), '10.2f'):>10} "
                  f"{fmt(v.get('flop_ratio_to_dino', 1.0), '11.2f'):>11} {fmt(v.get('mem_ratio_to_dino'), '9.2f'):>9} "
                  f"{v['head_tokens_per_image'][0]:>26.1f}, {v['head_tokens_per_image'][1]:.1f}")
        for n, v in r.items():
            if "host_syncs" in v:
                print(f"   {n}: host syncs in one step: {', '.join(v['host_syncs']) or 'none'}")
        print(f"   keeping one such step fed takes {r['pwself']['img_s'] / w['ours_img_s']:.1f} worker processes "
              f"({r['pwself']['img_s']:.0f} img/s / {w['ours_img_s']:.1f} per worker)")
        done()

    if device.type == "cpu" and platform.system() == "Linux":
        done = section("2b. peak memory of a ViT-S/16 step, 224/96x8 K=8192, float32, batch 8, as process "
                       "RSS on this CPU:")
        mem = bench_step_memory()
        report["cpu_step_memory"] = mem
        d, p = mem["dino"], mem["pwself"]
        print(f"   DINO {d['peak_mib']:.0f} MiB, PW-Self {p['peak_mib']:.0f} MiB ({p['peak_mib'] / d['peak_mib']:.2f}x); "
              f"over the process before the first step: DINO +{d['peak_mib'] - d['before_mib']:.0f} MiB, "
              f"PW-Self +{p['peak_mib'] - p['before_mib']:.0f} MiB "
              f"({(p['peak_mib'] - p['before_mib']) / (d['peak_mib'] - d['before_mib']):.2f}x)")
        done()

    done = section("3. matching, all 18 view pairs of a step at ViT-S/16 sizes (batch 64, 224/96 px, 8 locals, "
                   "D 384):")
    m = bench_matching(device, 64, 224, 96, 16, 384, 8, args.repeats * 4)
    report["matching"] = m
    print(f"   coords {m['coords_ms']:.3f} ms, intersection {m['intersection_ms']:.3f} ms, similarity "
          f"{m['similarity_ms']:.3f} ms ({m['similarity_over_coords']:.0f}x coords)")
    done()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out} ({time.perf_counter() - begin:.0f} s in all)")


if __name__ == "__main__":
    main()
