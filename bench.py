"""Throughput of the BYOL training step against its bound, on the current device.

Measures, for a preset of exp_table1_norms.py (default: cpu on a CPU, cifar10 on a GPU):
  (a) step:  the full training step of train_byol (sample batch, augment both views per image,
             online + target forward, backward, LARS/SGD step, EMA), images/s
  (b) bound: the same networks' forward + backward on one fixed pre-made pair of views
  (c) aug:   the batched augmentation alone (two views), images/s
  (d) probe: fitting the linear probe on 50,000 x 512 random-label features, seconds: the
             blog's liblinear fit (probe_s) and the standardized one (probe_std_s)
and ends with one line per memory format: memory_format=... step_img_s=... bound_img_s=... ratio=...
aug_img_s=... probe_s=... probe_std_s=... (--memory-format both: channels_last and NCHW in one run).

--grid measures what --jobs gains (executor.py) on a CPU, for the steps and cpu presets (or
--preset): the training steps per second of one run on every core (--jobs 1) against one run a
core, all at once (--jobs = cores), each timed in steady state (after warm-up, started together;
a run's few seconds of process start are left out, against the hour a steps-preset run takes). It
ends with grid_ratio=<the steps preset's ratio> (or the one preset's).

    python bench.py                      # cpu preset here
    python bench.py --preset cifar10 --steps 50
    python bench.py --grid --steps 200   # results/bench_grid.txt
"""
import argparse
import multiprocessing
import sys
import time

import torch

import augment
import common
import executor
import harness
import presets

# Table 1's presets, and the appendix's 'steps' preset (built for steps per second)
PRESETS = {**presets.TABLE1_PRESETS, "steps": presets.APPENDIX_PRESETS["steps"]}


def timed(fn, steps, device, warmup=2):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def measure(cfg, device, fmt, steps):
    """(step, bound, aug) seconds per batch with the convolutions in memory format fmt."""
    if device.type == "cpu" and fmt == torch.channels_last and common.conv_format(device, cfg.width) != fmt:
        # the oneDNN AVX2 kernel that writes out of bounds below 8 channels (common.conv_format)
        raise harness.UsageError(f"channels_last on a CPU needs a width that is a multiple of 8, not {cfg.width}")
    size = cfg.image_size or (96 if cfg.stem == "imagenet" else 32)
    n, B = 4 * cfg.batch_size, cfg.batch_size
    torch.manual_seed(0)
    x_all = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    gen = torch.Generator(device).manual_seed(0)
    s = common.build(cfg, device, image_size=size)
    s.model.to(memory_format=fmt)   # the format under test, not conv_format's choice
    apply = augment.compiled_apply_aug() if cfg.compile else augment.apply_aug

    def views(x):   # BYOL.views, in the format under test
        return list(augment.two_views(x, gen, s.model.mean, s.model.std, fmt=fmt, views=common.view_settings(cfg),
                                      apply=apply))
    fixed = views(x_all[:B])

    def bound():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.amp):
            out = s.step_fn(fixed)
        out["loss"].backward()

    def step():   # the loop body of common.train_byol
        x = x_all[torch.randint(0, n, (B,), generator=gen, device=device)]
        common.train_step(s, views(x), cfg.base_tau, 0)

    # bound timed before and after the step, best of the two: a conservative ratio
    t_bound = timed(bound, steps, device)
    t_step = timed(step, steps, device)
    t_bound = min(t_bound, timed(bound, steps, device))
    t_aug = timed(lambda: views(x_all[:B]), steps, device)
    return t_step, t_bound, t_aug


def grid_worker(preset, threads, steps, start, out):
    """One run's steps in a process of its own, on `threads` threads, timed from `start` (a barrier)."""
    torch.set_num_threads(threads)
    cfg = common.Config(**{**PRESETS[preset], "dataset": "synthetic"}, device="cpu")
    size = cfg.image_size or 32
    s, gen = common.build(cfg, torch.device("cpu"), image_size=size), torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4 * cfg.batch_size, 3, size, size), dtype=torch.uint8, generator=gen)

    def step():
        views = s.model.views(x[torch.randint(0, len(x), (cfg.batch_size,), generator=gen)], gen)
        common.train_step(s, views, cfg.base_tau, 0)
    for _ in range(3):
        step()
    start.wait()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    out.put(time.perf_counter() - t)


def grid_rate(preset, jobs, threads, steps):
    """Steps per second of `jobs` runs at once, `threads` each, over all of them."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=grid_worker, args=(preset, threads, steps, start, out)) for _ in range(jobs)]
    for p in procs:
        p.start()
    times = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return jobs * steps / max(times)


def grid(presets_, steps):
    n = executor.cores()
    ratios = {}
    for preset in presets_:
        one = grid_rate(preset, 1, n, steps)
        many = grid_rate(preset, n, 1, steps)
        ratios[preset] = many / one
        print(f"preset {preset}: --jobs 1 ({n} threads) {one:.2f} steps/s; --jobs {n} (1 thread each) {many:.2f} "
              f"steps/s, {many / n:.2f} a run; ratio {many / one:.2f}", flush=True)
    print(f"grid_ratio={ratios.get('steps', next(iter(ratios.values()))):.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (>= 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--grid", action="store_true", help="--jobs 1 against --jobs = cores, steps and cpu presets")
    p.add_argument("--memory-format", default="auto", choices=["auto", *FORMATS, "both"],
                   help="of the convolutions; auto: what training uses (common.conv_format); both: "
                        "measure channels_last and contiguous (NCHW) one after the other")
    args = p.parse_args()
    try:
        if args.steps < 1:
            raise harness.UsageError(f"--steps must be >= 1, got {args.steps}")
        device = harness.get_device(args.device)
    except harness.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.grid:
        if device.type != "cpu":
            print("error: --grid measures CPU runs (on GPUs --jobs is a run a device)", file=sys.stderr)
            sys.exit(2)
        return grid([args.preset] if args.preset else ["steps", "cpu"], args.steps)
    preset = args.preset or ("cifar10" if device.type == "cuda" else "cpu")
    cfg = common.Config(**{**PRESETS[preset], "dataset": "synthetic" if preset != "blog" else "stl10"},
                        device=str(device), compile=args.compile, precision=args.precision)
    B = cfg.batch_size
    print(f"preset {preset}: width {cfg.width}, {cfg.image_size or (96 if cfg.stem == 'imagenet' else 32)} px, batch {B}, "
          f"device {device}, threads {torch.get_num_threads()}, bf16 {common.use_bf16(cfg, device)}, "
          f"compile {cfg.compile}")
    if args.memory_format == "both":
        names = list(FORMATS)
    elif args.memory_format == "auto":
        names = [n for n, f in FORMATS.items() if f == common.conv_format(device, cfg.width)]
    else:
        names = [args.memory_format]

    feats = torch.randn(50000, 512, device=device)
    labels = torch.randint(0, 10, (50000,), device=device)
    for fit in (common.fit_liblinear, lambda x, y, k: common.fit_logreg(x, y, k, l2=1e-3)):
        fit(feats[:1000], labels[:1000], 10)(feats[:10]).tolist()   # warm-up: cuBLAS start-up is not the probe's time
    t = time.perf_counter()
    common.fit_liblinear(feats, labels, 10)(feats[:10]).tolist()
    t_probe = time.perf_counter() - t
    t = time.perf_counter()
    common.fit_logreg(feats, labels, 10, l2=1 / 50000)(feats[:10]).tolist()
    t_probe_std = time.perf_counter() - t

    for name in names:
        try:
            t_step, t_bound, t_aug = measure(cfg, device, FORMATS[name], args.steps)
        except harness.UsageError as e:
            print(f"memory_format={name} skipped: {e}")
            continue
        s, b = B / t_step, B / t_bound
        print(f"memory_format={name} step_img_s={s:.1f} steps_s={s / B:.1f} bound_img_s={b:.1f} ratio={s / b:.3f} "
              f"aug_img_s={B / t_aug:.1f} probe_s={t_probe:.2f} probe_std_s={t_probe_std:.2f}")


if __name__ == "__main__":
    main()
