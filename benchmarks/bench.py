"""Speed and memory of the SD 1.5 VAE: ours beside diffusers' AutoencoderKL on the same weights, in one
process.

    python benchmarks/bench.py                 # CPU --quick (default): threads + infer 256² + train 256²
                                               #   + options: ~10 min on 2 idle cores, 30-40 min on 2 shared
    python benchmarks/bench.py --full          # CPU: adds 256² b8, 512², 1024², a 512² training step: 1-3 h
    python benchmarks/bench.py --only threads  # the CPU acceptance table (1, 2, all threads; ~6 min idle)
    python benchmarks/bench.py --device cuda --full --compile --json out.json  # GPU tables (gpu_check.sh)

Sections (sizes square, "b" = batch; pick with --only):
  threads  `accept` at 1, 2 and all available threads, each in its own process (NNPACK's thread pool keeps the
           size of its first use): where NNPACK beats oneDNN, i.e. what the nnpack kernel's thread limit
           (vae_fast.DEFAULTS) should be, and ours with set_fast_kernels(True), as infer.py runs it, against
           diffusers (targets: <= 0.65x with 1 thread, <= 0.8x with 2, never slower).
  accept   encode+decode 256² fp32 b1 at this process's thread count: diffusers, ours (fast kernels on) with
           NNPACK's convolutions, ours with oneDNN's, interleaved, median of >= 3.
  infer    encode and decode. CPU quick: 256² b1 fp32/bf16; CPU full: also 256² b8, 512² b1, 1024² b1 fp32.
           GPU full: 256²/512²/1024² x fp32/bf16/fp16 x b1/b8, then tiled 2048² and 4096² b1 bf16 (ours: exact
           tiling, diffusers: blended tiles; FLOPs are those of the untiled model). No fp16 on CPU: it has no
           fast fp16 convolution kernels there and nobody runs it.
  train    train.py's own step (`build_run` + `train_step`: one VAE forward, L2 + LPIPS + KL +
           adaptive-weighted PatchGAN generator loss, discriminator step, two AdamW steps, clipping) in bf16
           autocast with disc_start_step = 0, so every loss term is live. CPU: 256² b1 (full: + 512² b1);
           GPU: 512² b8 (full: 256² b8, 512² b8/16). diffusers' model runs in the same step behind a
           6-line adapter (encode, sample, decode); beside it ours with the subpixel and (GPU) half_norm fast
           kernels switched on, and with --compile train.py's training.compile (GPU: also with the VAE and
           batch in channels_last, and with the LPIPS network and discriminator compiled too).
           --train-batch 16: the compiled runs at 512² b16.
  options  each speed choice alone: channels_last, sub-pixel upsampling, fused SDPA vs naive attention, AdamW
           for-loop/foreach/fused, TF32 (GPU), torch.compile of the decoder (--compile; slow on CPU).
Ours: set_fast_kernels(True) (as infer.py runs it) unless said otherwise; train.py's model is plain. Weights:
a random SD 1.5 VAE with perturbed GroupNorm weights and biases (tests/conftest.py): no downloads. LPIPS uses
a *random* VGG16 backbone (ImageNet weights are a download): the same FLOPs, so the same speed. FLOPs are
counted with torch.utils.flop_counter.FlopCounterMode (inference: on a meta-device copy; training: on the
first warm-up step). MFU = achieved / peak: dense spec peaks on known GPUs (table below); a shared CPU VM has
no honest spec figure, so on CPU "MFU" is relative to a large GEMM measured in the same process (marked *).
Peak memory: CUDA max_memory_allocated; on CPU the peak of live tensor memory from the profiler's allocation
events; both as the increase over what was allocated before the call (weights, optimizer state), in MiB. CPU
timings on a shared machine are noisy: every figure comes from interleaved runs (ours, diffusers, ours, ...);
tables give medians of wall time, and on CPU also the ratio of process CPU times, which other processes
disturb less.
"""
import argparse
import contextlib
import copy
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the project's files; the tests' SD 1.5 with perturbed norms
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from conftest import SD15, perturb_  # noqa: E402

import vae_fast  # noqa: E402
from vae import AutoencoderKL  # noqa: E402

try:
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # its "cast with to()" warning: we cast on purpose
except ImportError:  # then the diffusers columns are left out
    diffusers = None

# Dense tensor-core peaks, TFLOP/s, from NVIDIA's data sheets: (bf16/fp16, tf32, fp32). H200 = the H100 SXM
# chip with more memory. The practical bf16 GEMM ceiling on H100/H200 is ~790 (80% of spec).
GPU_PEAKS = [("H200", (989.4, 494.7, 66.9)), ("H100 PCIe", (756.5, 378.0, 51.2)),
             ("H100", (989.4, 494.7, 66.9)),
             ("A100", (312.0, 156.0, 19.5)), ("L40S", (362.1, 183.0, 91.6)), ("A10G", (70.0, 35.0, 31.2))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CL = torch.channels_last


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_models():
    """(ours with fast kernels on, diffusers' or None): CPU, fp32, eval, the same perturbed random SD 1.5
    weights."""
    torch.manual_seed(0)
    if diffusers is None:
        return perturb_(AutoencoderKL(**SD15)).eval().set_fast_kernels(True), None
    ref = perturb_(diffusers.AutoencoderKL(**SD15)).eval()
    ours = AutoencoderKL(**SD15).eval()
    ours.load_state_dict(ref.state_dict())
    return ours.set_fast_kernels(True), ref


# ------------------------------------------------------------------------------------------------ measuring
@contextlib.contextmanager
def kernels(model, **flags):
    """The model's fast kernels with `flags` ({kernel: setting}) changed, for a block, then its own again: so
    one model (and its optimizer state) can be timed with and without a kernel, interleaved."""
    old = dict(model.fast_kernels)
    model.set_fast_kernels(False, **{**old, **flags})
    try:
        yield
    finally:
        model.set_fast_kernels(False, **old)


def with_kernels(fn, model, *a, **flags):
    """fn(*a) with kernels(model, **flags)."""
    with kernels(model, **flags):
        return fn(*a)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def cpu_tensor_peak_mib(fn):
    """Run fn() under the profiler; return the peak of live CPU tensor memory above the start, from its
    allocation events (exact and independent of the allocator, unlike peak RSS; oneDNN's internal scratchpads
    are not in it)."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def measure(fns, dev, reps, warmup=1):
    """Run the callables interleaved (a, b, a, b, ...) so that machine load hits them alike; time the last
    `reps` rounds: wall time and process CPU time (less sensitive to other processes on a shared CPU). Peak
    memory: CUDA max_memory_allocated over the timed rounds; on CPU the first round (a warm-up one unless
    warmup=0) runs under the profiler's memory tracking. Returns {name: dict(med, min, cpu, peak, runs)}."""
    res = {k: dict(runs=[], cpu_runs=[], peak=0.0) for k in fns}
    for i in range(warmup + reps):
        for k, fn in fns.items():
            if dev.type == "cpu" and i == 0:
                res[k]["peak"] = cpu_tensor_peak_mib(fn)
                if warmup:
                    continue
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(dev)
            if i >= warmup:
                res[k]["runs"].append(time.perf_counter() - t0)
                res[k]["cpu_runs"].append(time.process_time() - c0)
            if dev.type == "cuda":
                res[k]["peak"] = max(res[k]["peak"], (torch.cuda.max_memory_allocated() - base) / 2**20)
    for v in res.values():
        v.update(med=statistics.median(v["runs"]), min=min(v["runs"]), cpu=statistics.median(v["cpu_runs"]))
    return res


def count_flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def meta_flops(op, batch, size):
    """FLOPs of our untiled encode or decode, counted on a meta-device copy (shapes only, no compute)."""
    with torch.device("meta"):
        m = AutoencoderKL(**SD15)
        shape = (batch, 4, size // 8, size // 8) if op == "decode" else (batch, 3, size, size)
        x = torch.empty(shape)
    fns = {"encode": lambda: m.encode(x).latent_dist.mean, "decode": lambda: m.decode(x).sample,
           "encode+decode": lambda: m.decode(m.encode(x).latent_dist.mode()).sample}
    return count_flops(fns[op])


_PEAKS = {}


def peak_tflops(dev, dtype):
    """(peak TFLOP/s for dtype, mark): the spec table on known GPUs, else a large GEMM measured here ('*')."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, (half, tf32, fp32) in GPU_PEAKS:
            if key in name:
                return (half if dtype != torch.float32 else
                        tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32), ""
    if dtype not in _PEAKS:
        n, iters = (8192, 20) if dev.type == "cuda" else (2048, 4)
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        r = measure({"mm": lambda: [a @ b for _ in range(iters)]}, dev, 3)["mm"]
        _PEAKS[dtype] = 2 * n**3 * iters / r["min"] / 1e12
    return _PEAKS[dtype], "*"


# ------------------------------------------------------------------------------------------------ tables
ROWS, OPTS, RESULTS = [], [], {}
ON_CPU = False  # set by main()


def add_row(what, size, batch, dt, r, flops, dev):
    """A main-table row: ours, diffusers (when measured), their time ratio, ours' TFLOP/s and MFU."""
    o, d = r["ours"], r.get("diffusers")
    peak, mark = peak_tflops(dev, DTYPES[dt])
    tf = flops / o["med"] / 1e12
    row = dict(what=what, size=size, batch=batch, dtype=dt, ours_ms=o["med"] * 1e3,
               ours_min_ms=o["min"] * 1e3, ours_img_s=batch / o["med"], ours_peak_mib=o["peak"], tflops=tf,
               mfu=tf / peak, mfu_mark=mark, gflop=flops / 1e9, ours_runs_s=o["runs"])
    if d:
        row.update(diff_ms=d["med"] * 1e3, diff_min_ms=d["min"] * 1e3, diff_img_s=batch / d["med"],
                   diff_peak_mib=d["peak"], ratio=o["med"] / d["med"], cpu_ratio=o["cpu"] / d["cpu"],
                   diff_runs_s=d["runs"])
    ROWS.append(row)
    log(f"  {what} {size}² b{batch} {dt}: ours {row['ours_ms']:.1f} ms"
        + (f", diffusers {row['diff_ms']:.1f} ms, ratio {row['ratio']:.3f}" if d else ""))


def add_opt(option, on, r, base, new, note=""):
    """An options-table row: `new` against `base`, two keys of one interleaved measure() result."""
    b, n = r[base], r[new]
    if ON_CPU:  # the less disturbed ratios too
        note = "; ".join(t for t in (note, f"CPU-time speedup {b['cpu'] / n['cpu']:.2f}x, best runs "
                                           f"{b['min'] / n['min']:.2f}x") if t)
    OPTS.append(dict(option=option, on=on, base=base, base_ms=b["med"] * 1e3, new=new, new_ms=n["med"] * 1e3,
                     speedup=b["med"] / n["med"], base_peak=b["peak"], new_peak=n["peak"], note=note))
    log(f"  {option} ({on}): {base} {b['med'] * 1e3:.1f} ms -> {new} {n['med'] * 1e3:.1f} ms")


def md(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def print_tables(with_ref, cpu):
    if ROWS:
        head = ["what", "size", "batch", "dtype", "ours ms", "ours img/s", "ours peak MiB"]
        if with_ref:
            head += ["diffusers ms", "diffusers img/s", "diffusers peak MiB", "ours/diffusers time"]
        head += ["ours/diffusers CPU time"] if with_ref and cpu else []
        rows = []
        for r in ROWS:
            cells = [r["what"], f"{r['size']}²", r["batch"], r["dtype"], f"{r['ours_ms']:.1f}",
                     f"{r['ours_img_s']:.3g}", f"{r['ours_peak_mib']:.0f}"]
            if with_ref:
                cells += [f"{r['diff_ms']:.1f}", f"{r['diff_img_s']:.3g}", f"{r['diff_peak_mib']:.0f}",
                          f"**{r['ratio']:.2f}**"] if "ratio" in r else ["-"] * 4
                cells += ([f"{r['cpu_ratio']:.2f}"] if "ratio" in r else ["-"]) if cpu else []
            mfu = f"{100 * r['mfu']:.1f}%{r['mfu_mark']}"
            rows.append(cells + [f"{r['gflop']:.0f}", f"{r['tflops']:.3g}", mfu])
        print(md(head + ["GFLOP", "TFLOP/s (ours)", "MFU (ours)"], rows) + "\n")
    if OPTS:
        head = ["option", "measured on", "baseline", "ms", "with it", "ms", "speedup",
                "peak MiB (base -> with)", "note"]
        print(md(head, [[o["option"], o["on"], o["base"], f"{o['base_ms']:.1f}", o["new"],
                         f"{o['new_ms']:.1f}", f"**{o['speedup']:.2f}x**",
                         f"{o['base_peak']:.0f} -> {o['new_peak']:.0f}", o["note"]] for o in OPTS]) + "\n")


# ------------------------------------------------------------------------------------------------ sections
def infer_section(ours, ref, dev, args, tiled_only=False):
    if tiled_only:  # its own section: GPU-sized, and slow if the exact tiler parks activations on the CPU
        plan = [(s, 1, "bf16" if dev.type == "cuda" else "fp32", True) for s in (2048, 4096)]
    elif dev.type == "cuda":
        plan = [(s, b, dt, False) for s in (256, 512, 1024) for dt in ("fp32", "bf16", "fp16")
                for b in (1, 8)]
        plan = plan if args.full else [(512, 8, "bf16", False)]
    else:
        plan = [(256, 1, "fp32", False), (256, 1, "bf16", False)]
        plan += [(256, 8, "fp32", False), (256, 8, "bf16", False), (512, 1, "fp32", False),
                 (512, 1, "bf16", False), (1024, 1, "fp32", False)] if args.full else []
    for size, batch, dt, tiled in plan:
        dtype = DTYPES[dt]
        models = {"ours": copy.deepcopy(ours).to(dev, dtype)}
        if ref is not None:
            models["diffusers"] = copy.deepcopy(ref).to(dev, dtype)
        for m in models.values():
            if tiled:  # each one's default: ours exact (seam-free), diffusers blended
                m.enable_tiling()
        x = torch.rand(batch, 3, size, size, device=dev, dtype=dtype) * 2 - 1
        z = torch.randn(batch, 4, size // 8, size // 8, device=dev, dtype=dtype)
        reps, warmup = (1, 1) if tiled else (args.reps, args.warmup)
        for op in ("encode", "decode"):
            def run(m, op=op, x=x, z=z):
                with torch.inference_mode():
                    return m.encode(x).latent_dist.mean if op == "encode" else m.decode(z).sample
            r = measure({k: (lambda m=m: run(m)) for k, m in models.items()}, dev, reps, warmup)
            add_row(op + (" tiled" if tiled else ""), size, batch, dt, r, meta_flops(op, batch, size), dev)
        del models, x, z
        if dev.type == "cuda":
            torch.cuda.empty_cache()


class DiffusersForTraining(torch.nn.Module):
    """diffusers' AutoencoderKL behind our forward(x, sample_posterior, generator) -> .sample, .latent_dist,
    which train_step expects: encode, sample, decode, as a diffusers-based trainer does."""

    def __init__(self, model):
        super().__init__()
        self.model, self.decoder = model, model.decoder  # train_step reads vae.decoder.conv_out.weight

    def forward(self, x, sample_posterior=False, generator=None):
        post = self.model.encode(x).latent_dist
        z = post.sample(generator) if sample_posterior else post.mode()
        return SimpleNamespace(sample=self.model.decode(z).sample, latent_dist=post)


def make_runs(ours, ref, dev, compile_vae=False, channels_last=False):
    """train.py runs (VAE, loss, discriminator, optimizers) for ours and for diffusers', on the same weights;
    compile_vae: training.compile for ours; channels_last: ours' VAE in NHWC (the batch must be too)."""
    import train
    cfg = train.config.Config()
    cfg.model.pretrained_model_name_or_path = None
    for key, value in SD15.items():
        setattr(cfg.model, key, value)
    cfg.training.precision, cfg.training.compile = "bf16-mixed", compile_vae
    # GAN + LPIPS live
    cfg.loss.disc_start_step, cfg.loss.disc_weight, cfg.loss.perceptual_weight = 0, 1.0, 0.5
    cfg.loss.random_lpips_backbone = True  # ImageNet VGG16 weights are a download; the FLOPs are the same
    runs = {"ours": train.build_run(cfg, dev)}
    runs["ours"].vae.load_state_dict(ours.state_dict())
    if channels_last:
        runs["ours"].vae.to(memory_format=CL)  # in place: the optimizer keeps its parameters
    if ref is not None:  # the same run with diffusers' model, and a VAE optimizer built like ours
        run, opt = train.build_run(cfg, dev), runs["ours"].opt_vae
        run.vae = run.train_vae = DiffusersForTraining(copy.deepcopy(ref).to(dev).train())
        accepted = inspect.signature(type(opt)).parameters  # .defaults also holds derived keys
        params = list(run.vae.parameters())  # (run.vae_params reads them back from run.opt_vae)
        run.opt_vae = type(opt)(params, **{k: v for k, v in opt.defaults.items() if k in accepted})
        run.sched_vae = torch.optim.lr_scheduler.LambdaLR(run.opt_vae, lambda step: 1.0)
        runs["diffusers"] = run
    return train, runs


def train_section(ours, ref, dev, args):
    """Ours (as train.py builds it) beside diffusers, and each training-relevant fast kernel switched on in
    the same interleaving (the same run, switched around its steps); with --compile, training.compile, and on
    a GPU training.compile with the VAE and the batch in channels_last (inductor picks its own layouts) and
    with the LPIPS network and the discriminator compiled too."""
    gpu = dev.type == "cuda"
    if gpu:
        plan = [(256, 8), (512, 8), (512, 16)] if args.full else [(512, args.train_batch or 8)]
    else:
        plan = [(256, 1)] + ([(512, 1)] if args.full else [])
    # several compiled runs of the same block classes (default: 8 graphs)
    torch._dynamo.config.cache_size_limit = 64
    for size, batch in plan:
        # Above batch 8 at 512² an eager step needs > 80 GB (66 GB at b8 with diffusers' model): compiled runs
        # only (with --compile), and no diffusers or switched-off rows.
        big = gpu and size * size * batch > 512 * 512 * 8
        switched = {} if big else {"+ sub-pixel upsampling": dict(subpixel=True)}
        if gpu and not big:  # CPU autocast keeps GroupNorm in bf16 either way
            switched["+ half GroupNorm under autocast"] = dict(half_norm=True)
        train, runs = make_runs(ours, None if big else ref, dev)
        if big and args.compile:
            del runs["ours"]
        x = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
        data, data_cl = [{"pixel_values": x}], [{"pixel_values": x.contiguous(memory_format=CL)}]

        def step(run, flags=None, d=data, train=train):
            with kernels(run.vae, **flags) if flags else contextlib.nullcontext():
                train.train_step(run, d, 0)
            run.opt_vae.zero_grad(set_to_none=True)  # so the next baseline is weights + optimizer state only
            run.opt_disc.zero_grad(set_to_none=True)
        fns = {k: (lambda run=run: step(run)) for k, run in runs.items()}
        fns |= {f"ours, {k}": (lambda f=f, run=runs["ours"]: step(run, f)) for k, f in switched.items()}
        flops = {}
        for k in [k for k in fns if k.startswith("ours")]:  # counting doubles as the first warm-up step
            t0 = time.perf_counter()
            flops[k] = count_flops(fns[k])
            sync(dev)
            log(f"  {k}: first step (FLOP counting{', cuDNN autotuning' if gpu else ''}) "
                f"{time.perf_counter() - t0:.0f} s")
        # training.compile (the VAE's blocks compiled in place, train.build_run): their own runs, default
        # switches. On a GPU also with the VAE and the batch in channels_last, and with the LPIPS network and
        # the discriminator compiled as well (not part of training.compile: measured here first).
        compiled = ["training.compile"] + (["training.compile, channels_last",
                                            "training.compile + LPIPS and discriminator"] if gpu else [])
        compiled = compiled if args.compile else []
        if compiled and "ours" not in flops:  # the same computation as eager: counted on one image, eager
            one = make_runs(ours, None, dev)[1]["ours"]
            flops["ours"] = count_flops(lambda one=one, x=x: step(one, d=[{"pixel_values": x[:1]}])) * batch
            del one
        for k in compiled:
            cl = "channels_last" in k
            run = make_runs(ours, None, dev, compile_vae=True, channels_last=cl)[1]["ours"]
            d = data_cl if cl else data
            if "LPIPS" in k:
                run.loss_fn.lpips.compile()
                run.disc.compile()
            t0 = time.perf_counter()
            try:  # an experiment that fails to compile is reported and left out; the other rows still come
                step(run, d=d)
            except Exception as e:
                log(f"  {k}: FAILED in its first step: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            sync(dev)
            log(f"  {k}: first step (compiling) {time.perf_counter() - t0:.0f} s")
            fns[f"ours, {k}"] = lambda run=run, d=d: step(run, d=d)
            flops[f"ours, {k}"] = flops["ours"]
        # CPU: warm-up 0, as measure()'s first, profiled round already warms diffusers' run up.
        r = measure(fns, dev, args.train_steps, max(args.warmup - 1, 0) if gpu else 0)
        for k in [k for k in flops if k in r]:
            add_row("train step" + k[4:], size, batch, "bf16", {**r, "ours": r[k]}, flops[k], dev)
        del runs, data, data_cl, fns
        if gpu:
            torch.cuda.empty_cache()


def accept_section(ours, ref, dev, args):
    """Encode+decode 256² fp32 b1 at this process's thread count, interleaved, median of >= 3: diffusers, ours
    (fast kernels on) with NNPACK's convolutions and without (oneDNN's, as diffusers'; sub-pixel upsamplers).
    set_fast_kernels(True) takes one of the two (NNPACK up to its thread limit): the `threads` section runs
    this at 1, 2 and all threads, each in its own process (NNPACK's pool keeps the size of its first use)."""
    x = torch.rand(1, 3, 256, 256, device=dev) * 2 - 1
    threads = torch.get_num_threads()
    models = {"ours, NNPACK": copy.deepcopy(ours).set_fast_kernels(True, nnpack=threads),
              "ours, oneDNN": copy.deepcopy(ours).set_fast_kernels(True, nnpack=False)}
    conv = ours.decoder.conv_in
    with torch.no_grad():
        nnpack = isinstance(conv, vae_fast.Conv2d) and conv.uses_nnpack(x[:, :4])
        default = "ours, NNPACK" if nnpack else "ours, oneDNN"
    models |= {"diffusers": ref} if ref is not None else {}

    def enc_dec(m):
        with torch.inference_mode():
            return m.decode(m.encode(x).latent_dist.mode()).sample
    r = measure({k: (lambda m=m: enc_dec(m)) for k, m in models.items()}, dev, max(3, args.accept_reps), 1)
    add_row(f"encode+decode, {torch.get_num_threads()} threads", 256, 1, "fp32", {**r, "ours": r[default]},
            meta_flops("encode+decode", 1, 256), dev)
    add_opt("NNPACK 3x3 convs", f"ours encode+decode 256² b1 fp32, {torch.get_num_threads()} threads", r,
            "ours, oneDNN", "ours, NNPACK")
    if ref is None:
        return "ACCEPTANCE: diffusers is not installed, no ratio"
    with torch.inference_mode():
        exact = copy.deepcopy(ours).set_fast_kernels(False)
        want = enc_dec(ref)
        diffs = {k: (enc_dec(m) - want).abs().max().item() for k, m in (*models.items(), ("exact", exact))
                 if k != "diffusers"}
    d = r["diffusers"]
    figures = {k: dict(ms=1e3 * r[k]["med"], ratio=r[k]["med"] / d["med"], min_ratio=r[k]["min"] / d["min"],
                       cpu_ratio=r[k]["cpu"] / d["cpu"], max_abs=diffs.get(k)) for k in r}
    RESULTS.update(threads=torch.get_num_threads(), default=default, figures=figures,
                   exact_max_abs=diffs["exact"])
    return (f"ACCEPT ({dev.type}, fp32, encode+decode 256² b1, {torch.get_num_threads()} threads, "
            f"{len(d['runs'])} interleaved runs each): diffusers {figures['diffusers']['ms']:.0f} ms median; "
            + "; ".join(f"{k} {f['ms']:.0f} ms = {f['ratio']:.3f}x (minima {f['min_ratio']:.3f}x, CPU times "
                        f"{f['cpu_ratio']:.3f}x, max abs {f['max_abs']:.1e})"
                        for k, f in figures.items() if k != "diffusers")
            + f"; set_fast_kernels(True) here: {default}; plain: max abs {diffs['exact']:.1e}.")


# The CPU targets of encode+decode 256² fp32, ours/diffusers (medians): NNPACK must win where it is on by
# default, and the default must never be slower than diffusers.
THREAD_TARGETS = {1: 0.65, 2: 0.8}


def threads_section(args):
    """accept_section at 1, 2 and all available threads, each in a fresh process; the table says where NNPACK
    wins, which is what the nnpack kernel's thread limit (vae_fast.DEFAULTS) should say."""
    import subprocess
    import tempfile
    rows = []
    for n in sorted({1, 2, os.cpu_count() or 1}):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--only", "accept",
                   "--threads", str(n), "--accept-reps", str(args.accept_reps), "--json", f.name]
            log(f"  {n} threads: {' '.join(cmd[1:])}")
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            out = json.load(open(f.name)) if done.returncode == 0 else {}
            loads = [line.split(": ")[-1] for line in out.get("header", []) if "load average" in line]
            res = dict(out.get("results", {}), load=" -> ".join(loads))
        if "figures" not in res:
            log(f"  {n} threads: FAILED (exit {done.returncode})")
            continue
        fig, default = res["figures"], res["default"]
        target = THREAD_TARGETS.get(n, 1.0)
        rows.append([n, f"{fig['diffusers']['ms']:.0f}"] + [f"{fig[k]['ms']:.0f} ({fig[k]['ratio']:.3f}x)"
                                                           for k in ("ours, NNPACK", "ours, oneDNN")]
                    + [default[6:], f"**{fig[default]['ratio']:.3f}x**", f"<= {target}",
                       "PASS" if fig[default]["ratio"] <= target else "FAIL",
                       "NNPACK" if fig["ours, NNPACK"]["ratio"] < fig["ours, oneDNN"]["ratio"] else "oneDNN",
                       f"{fig[default]['max_abs']:.1e} ({res['exact_max_abs']:.1e})", res["load"]])
    return md(["threads", "diffusers ms", "ours NNPACK ms (x diffusers)", "ours oneDNN ms (x diffusers)",
               "fast kernels take", "ours/diffusers", "target", "verdict", "faster here",
               "max abs vs diffusers (plain)", "load average (start -> end)"], rows)

def naive_attention(self, x):
    """Attention before SDPA (LDM's AttnBlock): the full (HW x HW) score matrix, a softmax, a matmul."""
    B, C, H, W = x.shape
    h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    h = torch.softmax(q @ k.transpose(1, 2) * C**-0.5, dim=-1) @ v
    return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


def options_section(ours, ref, dev, args):
    gpu = dev.type == "cuda"
    size, batch, dt = (512, 8, "bf16") if gpu else (256, 1, "fp32")
    dtype, on = DTYPES[dt], f"decode {size}² b{batch} {dt}"
    z = torch.randn(batch, 4, size // 8, size // 8, device=dev, dtype=dtype)
    zcl = z.contiguous(memory_format=CL)
    m = copy.deepcopy(ours).to(dev, dtype)
    cl = copy.deepcopy(m).to(memory_format=CL)

    def dec(fn, zz):
        with torch.inference_mode():
            return fn(zz).sample
    fns = {"NCHW": lambda: dec(m.decode, z), "channels_last": lambda: dec(cl.decode, zcl)}
    # (on CPU this decode takes NNPACK's path, which sub-pixel upsampling leaves alone: measured below)
    if gpu:
        fns["NCHW, nearest + 3x3 conv"] = lambda: with_kernels(dec, m, m.decode, z, subpixel=False)
    if ref is not None:  # the GPU criterion: ours against diffusers' eager default (NCHW)
        refm = copy.deepcopy(ref).to(dev, dtype)
        fns["diffusers NCHW"] = lambda: dec(refm.decode, z)
    if args.compile:  # default mode; "max-autotune" would tune far longer
        compiled = torch.compile(cl.decode)
        t0 = time.perf_counter()
        dec(compiled, zcl)
        sync(dev)
        t_compile = time.perf_counter() - t0
        fns["compiled channels_last"] = lambda: dec(compiled, zcl)
    r = measure(fns, dev, args.reps, args.warmup)
    add_opt("channels_last", "ours " + on, r, "NCHW", "channels_last")
    if gpu:
        add_opt("sub-pixel upsampling", "ours " + on, r, "NCHW, nearest + 3x3 conv", "NCHW")
    else:  # where CPU inference does not take NNPACK: bf16, and fp32 with NNPACK off
        for dt2, flags in (("bf16", {}), ("fp32", dict(nnpack=False))):
            m2, z2 = copy.deepcopy(ours).to(dev, DTYPES[dt2]), z.to(DTYPES[dt2])
            fns2 = {"nearest + 3x3 conv": dict(subpixel=False), "sub-pixel": {}}
            r2 = measure({k: (lambda f=f, m2=m2, z2=z2, flags=flags: with_kernels(dec, m2, m2.decode, z2, **f,
                                                                                   **flags))
                          for k, f in fns2.items()}, dev, args.reps, args.warmup)
            add_opt("sub-pixel upsampling", f"ours decode {size}² b{batch} {dt2}"
                    + (", NNPACK off" if flags else ""), r2, "nearest + 3x3 conv", "sub-pixel")
            del m2
    if ref is not None:
        add_opt("ours NCHW vs diffusers default", on, r, "diffusers NCHW", "NCHW")
        add_opt("ours channels_last vs diffusers default", on, r, "diffusers NCHW", "channels_last")
    if args.compile:
        add_opt("torch.compile", "ours " + on, r, "channels_last", "compiled channels_last",
                f"first call (compiling) {t_compile:.0f} s")
        if ref is not None:
            add_opt("ours compiled vs diffusers default", on, r, "diffusers NCHW", "compiled channels_last")
    if gpu:  # TF32 for fp32 convs and matmuls (the bench runs with it on; PyTorch's matmul default is off)
        m32, z32 = copy.deepcopy(ours).to(dev), torch.randn(1, 4, 64, 64, device=dev)

        def with_tf32(flag):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = flag
            try:
                return dec(m32.decode, z32)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        r = measure({"fp32": lambda: with_tf32(False), "tf32": lambda: with_tf32(True)}, dev, args.reps,
                    args.warmup)
        add_opt("TF32", "ours decode 512² b1 fp32", r, "fp32", "tf32")
        del m32
    # Attention: the mid block alone on the latent of a 512² (CPU) / 1024² (GPU) image: 4096 / 16384 tokens.
    attn, side = copy.deepcopy(ours.decoder.mid_block.attentions[0]).to(dev, dtype), 128 if gpu else 64
    h = torch.randn(1, attn.to_q.in_features, side, side, device=dev, dtype=dtype)

    def run_attn(naive):
        with torch.inference_mode():
            return naive_attention(attn, h) if naive else attn(h)
    r = measure({"naive": lambda: run_attn(True), "SDPA": lambda: run_attn(False)}, dev, args.reps,
                args.warmup)
    add_opt("fused SDPA attention", f"mid-block attention, {side}x{side} latent, {dt}", r, "naive", "SDPA")
    # AdamW over the VAE's 83.7M parameters: one step, gradients present.
    params = [torch.nn.Parameter(p.detach().clone().to(dev)) for p in ours.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {k: torch.optim.AdamW(params, lr=1e-9, betas=(0.5, 0.9), **kw) for k, kw in
            (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True)))}
    r = measure({k: o.step for k, o in opts.items()}, dev, args.reps, args.warmup)
    add_opt("AdamW", "one step, VAE parameters", r, "for-loop", "foreach")
    add_opt("AdamW", "one step, VAE parameters", r, "for-loop", "fused")
    del params, opts


def gpu_acceptance():
    """The issue's GPU criteria, from what was measured: decode 512² bf16 b8 >= 1.3x diffusers' eager default
    (ours as it is, in channels_last, compiled), and a 512² bf16 training step >= 30 images/s."""
    out = [f"{o['option']}: {o['speedup']:.2f}x ({'PASS' if o['speedup'] >= 1.3 else 'FAIL'}, target >= 1.3x)"
           for o in OPTS if o["option"].startswith("ours ") and o["on"] == "decode 512² b8 bf16"]
    out += [f"{r['what']} 512² b{r['batch']} bf16: {r['ours_img_s']:.1f} images/s "
            f"({'PASS' if r['ours_img_s'] >= 30 else 'FAIL'}, target >= 30)"
            for r in ROWS if r["what"].startswith("train step") and r["size"] == 512]
    return "GPU ACCEPTANCE: " + "; ".join(out) if out else None


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description="SD 1.5 VAE speed and memory, ours beside diffusers (see the "
                                "docstring).")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda if available)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the small plan (the default)")
    mode.add_argument("--full", action="store_true", help="every size/dtype/batch of the plan")
    p.add_argument("--only", default="threads,infer,train,options",
                   help="comma list of threads,accept,infer,tiled,train,options (threads: accept at 1, 2 and "
                        "all threads, each in its own process; tiled: 2048² and 4096², for GPUs)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per figure (default: CPU 3, GPU 5)")
    p.add_argument("--accept-reps", type=int, default=7,
                   help="interleaved runs for the acceptance figure (>= 3)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="timed training steps (default: CPU 2, GPU 5)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="GPU training batch at 512² (default 8; above 8, with --compile: compiled runs only)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: CPU 1, GPU 2)")
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile (minutes of compiling on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(sections) - {"threads", "accept", "infer", "tiled", "train", "options"})
    if bad or not sections:
        p.error(f"--only: unknown section(s) {', '.join(bad)}; choose from threads, accept, infer, tiled, "
                "train, options")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available")
    gpu = dev.type == "cuda"
    global ON_CPU
    ON_CPU = not gpu
    args.reps = args.reps or (5 if gpu else 3)
    args.train_steps = args.train_steps or (5 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    # for both models alike: TF32 for fp32 convs/matmuls (the options table measures it), cuDNN autotuning
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                         if line.startswith("model name")), name)
        name += f", {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    header = [f"date: {datetime.datetime.now().isoformat(timespec='seconds')}", f"device: {name}",
              f"torch {torch.__version__}, " + (f"diffusers {diffusers.__version__}" if diffusers else
                                                 "diffusers not installed (its columns are left out)"),
              "command: python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)]
    if hasattr(os, "getloadavg"):
        header.append(f"load average at start: {os.getloadavg()[0]:.1f}")
    log("\n".join(header))
    ours, ref = build_models()
    accept, threads_table, t0 = None, None, time.perf_counter()
    for s in sections:
        log(f"[{s}]")
        if s == "accept":
            accept = accept_section(ours, ref, dev, args)
        elif s == "threads":
            threads_table = threads_section(args)
        elif s == "tiled":
            infer_section(ours, ref, dev, args, tiled_only=True)
        else:
            dict(infer=infer_section, train=train_section, options=options_section)[s](ours, ref, dev, args)
        if args.json:  # after every section: a time limit that cuts the run short keeps what was measured
            with open(args.json, "w") as f:
                json.dump(dict(header=header, rows=ROWS, options=OPTS, acceptance=accept, results=RESULTS), f,
                          indent=1)
    peaks = {dt: peak_tflops(dev, DTYPES[dt]) for dt in ("fp32", "bf16")} if ROWS else {}
    header.append(f"wall time {time.perf_counter() - t0:.0f} s"
                  + (f", load average at end: {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""))
    header.append("peak TFLOP/s for MFU: " + ", ".join(f"{k} {v:.3g}{m}" for k, (v, m) in peaks.items())
                  + ("" if gpu else " (* = a 2048² GEMM measured in this process, not a spec figure)"))
    header.append("weights: random SD 1.5 VAE, perturbed GroupNorm/biases; LPIPS on a random VGG16 backbone "
                  "(same FLOPs as the real one)")
    header.append("times: medians of interleaved runs (ours, diffusers, ours, ...); peak memory: increase "
                  "over what was allocated before the call (weights, optimizer state)")
    print("\n".join(header) + "\n")
    print_tables(ref is not None, not gpu)
    if threads_table:
        print("CPU encode+decode 256² fp32 b1 by thread count (each its own process; medians of interleaved "
              "runs):\n" + threads_table + "\n")
    accept = "\n".join(a for a in (accept, gpu_acceptance() if gpu else None) if a)
    print(accept)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=ROWS, options=OPTS, acceptance=accept, results=RESULTS,
                           threads=threads_table, peaks={k: v for k, (v, _) in peaks.items()}), f, indent=1)


if __name__ == "__main__":
    main()
