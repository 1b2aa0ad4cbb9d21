"""Tiled encode/decode benchmark (vae_tiling.py): seam-free ("exact") tiles against untiled, blended and
diffusers.

    python benchmarks/bench_tiling.py                   # all sections (the GPU one only with CUDA)
    python benchmarks/bench_tiling.py --section memory --size 1024 --repeats 2
    python benchmarks/bench_tiling.py --section psnr    # tiled-vs-untiled PSNR, 512^2 image, 256^2 tiles
    python benchmarks/bench_tiling.py --section gpu --gpu_size 4096

Sections (random SD 1.5 weights with perturbed GroupNorm/bias parameters: no download; figures about memory
and time do not depend on the weights, PSNR figures measure only how far tiling moves the output):
  memory  CPU fp32 decode of a size^2 image's latent, each variant in a fresh subprocess: peak resident memory
          above the loaded model (VmHWM after a reset through /proc/self/clear_refs, minus VmRSS after loading
          the model and a small warm-up decode), wall time and process CPU time. Variants run interleaved,
          `repeats` rounds, so that load from other processes hits them alike. Ratios to ours untiled: the
          median over rounds of the wall-time ratio within a round, and the ratio of the least process CPU
          times (steadier on a busy machine).
  psnr    tiled vs untiled, for decode (image range [-1, 1]: peak-to-peak 2) and for encode (posterior mean;
          peak-to-peak of the untiled latent): ours exact, ours blended, diffusers' tiling, same weights and
          tiles.
  gpu     bf16 decode of a gpu_size^2 image's latent: time and torch.cuda.max_memory_allocated, ours
          exact-tiled (activations over 1 GiB parked in CPU memory), ours untiled (if it fits) and diffusers'
          tiling.
run_memory / run_psnr / run_gpu return their rows as dicts as well as printing them.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the project's files; the tests' SD 1.5 with perturbed norms
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from conftest import SD15, perturb_  # noqa: E402

from vae import AutoencoderKL  # noqa: E402

VARIANTS = ["ours-untiled", "ours-exact", "ours-blend", "diffusers-untiled", "diffusers-tiled"]


def models(which):
    """(diffusers model or None, ours with fast kernels on or None): the same perturbed random SD 1.5 weights,
    eval mode."""
    torch.manual_seed(0)
    ref = ours = None
    if which in ("diffusers", "both"):
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
        ref = perturb_(DiffusersAutoencoderKL(**SD15)).eval()
    if which in ("ours", "both"):
        ours = AutoencoderKL(**SD15).eval()
        if ref is not None:
            ours.load_state_dict(ref.state_dict())
        else:
            perturb_(ours)
        ours.set_fast_kernels(True)  # as infer.py runs it
    return ref, ours


def set_tiling(model, variant, tile=None):
    """Switch tiling for a variant name ('...-untiled', 'ours-exact', 'ours-blend', 'diffusers-tiled')."""
    if variant.startswith("ours"):
        model.disable_tiling()
        if variant != "ours-untiled":
            model.enable_tiling(tile_sample_size=tile, mode=variant.split("-")[1])
    else:
        model.disable_tiling()
        if variant == "diffusers-tiled":
            if tile is not None:  # diffusers has no argument for it: set its attributes
                model.tile_sample_min_size, model.tile_latent_min_size = tile, tile // 8
            model.enable_tiling()


def photo(size):
    """skimage's astronaut as a (1, 3, size, size) tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image
    from skimage import data
    pil = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()[None] / 127.5 - 1.0


def psnr(a, b, peak):
    return (10 * torch.log10(peak ** 2 / (a.double() - b.double()).pow(2).mean())).item()


# ----------------------------------------------------------------------------------------------------------
# memory / time on CPU


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(variant, size, threads, tile=None):
    """One variant in this (fresh) process; prints a JSON line."""
    if threads:
        torch.set_num_threads(threads)
    ref, ours = models("diffusers" if variant.startswith("diffusers") else "ours")
    model = ref if ours is None else ours
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.decode(z[:, :, :8, :8])  # warm-up: thread pools, oneDNN, allocator
        set_tiling(model, variant, tile)
        base = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak) to the current RSS
            reset = True
        except OSError:
            reset = False  # then ru_maxrss: a peak over the whole process, an upper bound
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.decode(z).sample
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()
    print(json.dumps(dict(variant=variant, peak_mb=(peak - base) / 1024, wall_s=wall, cpu_s=cpu,
                          threads=torch.get_num_threads(), exact_peak=reset)))


def run_memory(size=1024, repeats=2, threads=0, variants=VARIANTS, tile=None):
    print(f"\n== CPU fp32 decode of a {size}x{size} image ({size // 8}x{size // 8} latent), "
          f"{repeats} interleaved rounds, {threads or torch.get_num_threads()} threads ==")
    results = {v: [] for v in variants}
    for r in range(repeats):
        # rotate, so no variant is always first
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", v, "--size", str(size),
                   "--threads", str(threads)] + (["--tile", str(tile)] if tile else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                why = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode
                print(f"{v}: failed: {why}")
                continue
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["round"] = r
            results[v].append(res)
            print(f"  round {r}: {v:18s} peak {res['peak_mb']:7.0f} MB  wall {res['wall_s']:6.1f} s  "
                  f"cpu {res['cpu_s']:6.1f} s", flush=True)
    # Ratios to ours untiled: wall time per round (same round, similar load), and the least CPU time of each
    # (process CPU time is not inflated by waiting for a shared core, so it is the steadier figure here).
    base = {x["round"]: x["wall_s"] for x in results.get("ours-untiled", [])}
    base_cpu = min((x["cpu_s"] for x in results.get("ours-untiled", [])), default=None)
    rows = []
    print(f"{'variant':18s} {'peak above model':>17s} {'wall s (rounds)':>16s} {'wall ratio':>11s} "
          f"{'min cpu s':>10s} {'cpu ratio':>10s}")
    for v in variants:
        rs = results[v]
        if not rs:
            continue
        ratios = [x["wall_s"] / base[x["round"]] for x in rs if x["round"] in base]
        row = dict(variant=v, peak_mb=max(x["peak_mb"] for x in rs), wall_s=[x["wall_s"] for x in rs],
                   wall_ratio=statistics.median(ratios) if ratios else None,
                   cpu_s=min(x["cpu_s"] for x in rs))
        row["cpu_ratio"] = row["cpu_s"] / base_cpu if base_cpu else None
        rows.append(row)
        walls = " ".join(f"{w:.1f}" for w in row["wall_s"])
        wall_ratio = "" if row["wall_ratio"] is None else f"{row['wall_ratio']:.2f}x"
        cpu_ratio = "" if row["cpu_ratio"] is None else f"{row['cpu_ratio']:.2f}x"
        print(f"{v:18s} {row['peak_mb']:14.0f} MB {walls:>16s} {wall_ratio:>11s} {row['cpu_s']:10.1f} "
              f"{cpu_ratio:>10s}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# PSNR tiled vs untiled


@torch.no_grad()
def run_psnr(size=512, tile=256):
    print(f"\n== tiled vs untiled PSNR, {size}x{size} photo, {tile}x{tile} tiles, random SD 1.5 weights with "
          f"perturbed GroupNorm/bias ==")
    ref, ours = models("both")
    x = photo(size)
    rows = []
    for name, model, variants in (("ours", ours, ["ours-exact", "ours-blend"]),
                                  ("diffusers", ref, ["diffusers-tiled"])):
        set_tiling(model, f"{name}-untiled")
        lat = model.encode(x).latent_dist.mean
        dec = model.decode(lat).sample
        for v in variants:
            set_tiling(model, v, tile)
            lat_t = model.encode(x).latent_dist.mean
            dec_t = model.decode(lat).sample
            row = dict(variant=v, decode_db=psnr(dec_t, dec, 2.0),
                       decode_maxabs=(dec_t - dec).abs().max().item(),
                       encode_db=psnr(lat_t, lat, (lat.max() - lat.min()).item()))
            rows.append(row)
            print(f"{v:18s} decode {row['decode_db']:6.1f} dB (max abs {row['decode_maxabs']:.2e})   "
                  f"encode (latent mean) {row['encode_db']:6.1f} dB", flush=True)
        set_tiling(model, f"{name}-untiled")
    return rows


# ----------------------------------------------------------------------------------------------------------
# GPU


@torch.no_grad()
def run_gpu(size=4096, dtype=torch.bfloat16, with_untiled=True, with_diffusers=True):
    if not torch.cuda.is_available():
        print("\n== GPU: CUDA not available, skipped ==")
        return []
    print(f"\n== GPU ({torch.cuda.get_device_name()}): {str(dtype)[6:]} decode of a {size}x{size} image "
          f"({size // 8}x{size // 8} latent) ==")
    ref, ours = models("both" if with_diffusers else "ours")
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    variants = ["ours-exact"] + ["ours-untiled"] * with_untiled + ["diffusers-tiled"] * with_diffusers
    rows, outs = [], {}
    for v in variants:
        model = (ours if v.startswith("ours") else ref).to("cuda", dtype)
        set_tiling(model, v)
        # warm-up at a quarter of the size (tiled the same way)
        model.decode(z[:, :, :size // 16, :size // 16])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            t0 = time.perf_counter()
            out = model.decode(z).sample
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            print(f"{v:18s} out of GPU memory")
            model.to("cpu")
            torch.cuda.empty_cache()
            continue
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
        outs[v] = out.float().cpu()
        del out
        row = dict(variant=v, wall_s=wall, peak_gib=peak,
                   total_peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                   finite=bool(torch.isfinite(outs[v]).all()))
        rows.append(row)
        print(f"{v:18s} {wall:7.2f} s   peak {peak:6.2f} GiB above the model "
              f"({row['total_peak_gib']:.2f} GiB allocated in all)   finite {row['finite']}", flush=True)
        model.to("cpu")
        torch.cuda.empty_cache()
    if "ours-untiled" in outs:
        for v in ("ours-exact", "diffusers-tiled"):
            if v in outs:
                db = psnr(outs[v], outs["ours-untiled"], 2.0)
                print(f"{v:18s} vs ours untiled ({str(dtype)[6:]}): PSNR {db:.1f} dB")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["all", "memory", "psnr", "gpu"], default="all")
    p.add_argument("--size", type=int, default=1024, help="memory section: image side in pixels")
    p.add_argument("--repeats", type=int, default=2, help="memory section: interleaved rounds")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU sections: torch threads (0: torch's default; 1: steady CPU times on a shared "
                        "machine)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="memory section: comma-separated subset")
    p.add_argument("--tile", type=int, default=None,
                   help="memory section: tile_sample_size for the tiled variants (default: the model's, 512)")
    p.add_argument("--psnr_size", type=int, default=512)
    p.add_argument("--psnr_tile", type=int, default=256)
    p.add_argument("--gpu_size", type=int, default=4096)
    p.add_argument("--gpu_skip_untiled", action="store_true",
                   help="gpu section: skip the (large) untiled decode")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.size, a.threads, a.tile)
    for n in (a.size, a.psnr_size, a.gpu_size):
        if n % 8 or n < 64:
            p.error(f"sizes must be multiples of 8, at least 64 (got {n})")
    variants = a.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        p.error(f"--variants: choose from {','.join(VARIANTS)}")
    if a.section in ("all", "memory"):
        run_memory(a.size, a.repeats, a.threads, variants, a.tile)
    if a.section in ("all", "psnr"):
        if a.threads:
            torch.set_num_threads(a.threads)
        run_psnr(a.psnr_size, a.psnr_tile)
    if a.section in ("all", "gpu"):
        run_gpu(a.gpu_size, with_untiled=not a.gpu_skip_untiled)


if __name__ == "__main__":
    main()
