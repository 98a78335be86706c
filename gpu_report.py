"""On a GPU, run this first: one command that checks the GPU path and measures its speed, and
writes everything it found to one report file (runs/gpu_report.txt by default: results/ holds only
the committed reference results).

    python gpu_report.py                          # ~5-8 minutes on one GPU
    python gpu_report.py --device cpu --quick     # the same checks in seconds (what CI runs)

Sections, each run on its own (a failure is written down and the next section runs):
  env         torch, CUDA, cuDNN, the device
  smoke       every variant of exp_table1_norms.py for one epoch on synthetic data, on the device
  speed       steady images/s of the training step (bench.measure) for bf16 and fp32, eager and
              compiled (--compile off in --quick and on CPU), channels_last and NCHW
  epoch       one epoch of the cifar10 preset (CIFAR-10 if found, else synthetic images), probe included
  probe       both probe fits on 50,000 x 512 features, after a warm-up fit
  syncs       host-device synchronizations in 20 steps of the hot loop (torch.cuda.set_sync_debug_mode)
  rerun       the same seed twice (identical rows?) and a run resumed from its checkpoint
  collapse    byol against no_norm, 2 epochs of the cifar10 preset: the finding at a glance
The report needs no ../shared: without CIFAR-10 the epoch and collapse sections use synthetic
images and say so (--data-dir DIR points to a cifar-10-batches-py/ folder).
"""
import argparse
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import bench
import common
import runtime
import exp_table1_norms
import harness


def config(preset, device, **over):
    return common.Config(**{**exp_table1_norms.PRESETS[preset], "device": str(device), **over})


def small(device, **over):
    return config("cpu", device, **{**harness.SMOKE, "epochs": 1, **over})


def section_env(args, device, data):
    out = [f"torch {torch.__version__}, python {platform.python_version()}, device {device}"]
    if device.type == "cuda":
        out.append(f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                   f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPU(s)")
    out.append(f"data: {'CIFAR-10 from ' + data['source'] if data['real'] else 'synthetic images (' + data['why'] + ')'}")
    return out


def section_smoke(args, device, data):
    out = []
    names = ("byol", "contrastive") if args.quick else [v for v in exp_table1_norms.VARIANTS if v != "random"]
    for name in names:
        over = dict(exp_table1_norms.VARIANTS[name])
        model_fn = over.pop("model_fn", None)   # contrastive: contrastive.InfoNCE
        rows = common.train_byol(small(device, **over), data=runtime.make_synthetic(), model_fn=model_fn)
        out.append(f"{name}: loss {rows[-1]['loss']:.4g}, probe {rows[-1]['probe_acc']:.1f}")
    return out


def section_speed(args, device, data):
    preset = "smoke" if args.quick else "cifar10"
    out = []
    compiles = (False,) if args.quick or device.type != "cuda" else (False, True)
    # --quick on a CPU: fp32 only (bf16 autocast is emulated, and slow, on CPUs without AVX-512 BF16)
    precisions = ("fp32",) if args.quick and device.type == "cpu" else ("bf16", "fp32")
    for precision in precisions:
        for compile_ in compiles:
            for fmt in bench.FORMATS:
                over = dict(precision=precision, compile=compile_, dataset="synthetic")
                cfg = small(device, **over) if args.quick else config(preset, device, **over)
                try:
                    t_step, t_bound, t_aug = bench.measure(cfg, device, bench.FORMATS[fmt], 2 if args.quick else 30)
                except harness.UsageError as e:   # channels_last at a narrow width on a CPU
                    out.append(f"{preset} {precision} compile={compile_} {fmt}: skipped ({e})")
                    continue
                out.append(f"{preset} {precision} compile={compile_} {fmt}: step {cfg.batch_size / t_step:.0f} img/s, "
                           f"networks alone {cfg.batch_size / t_bound:.0f} img/s, augmentation {cfg.batch_size / t_aug:.0f} img/s")
    return out


def section_epoch(args, device, data):
    cfg = (small(device, train_subset=256) if args.quick
           else config("cifar10", device, epochs=1, dataset="cifar10" if data["real"] else "synthetic"))
    t = time.perf_counter()
    rows = common.train_byol(cfg, data=data["dict"])
    return [f"one epoch of {len(data['dict']['pretrain_x'][:cfg.train_subset or None])} images at batch "
            f"{cfg.batch_size}, probe included: {time.perf_counter() - t:.1f} s (wall_s of the row: {rows[-1]['wall_s']})"]


def section_probe(args, device, data):
    n = 2000 if args.quick else 50000
    feats, labels = torch.randn(n, 512, device=device), torch.randint(0, 10, (n,), device=device)
    out = []
    for name, fit in (("liblinear", lambda: common.fit_liblinear(feats, labels, 10)),
                      ("standardized", lambda: common.fit_logreg(feats, labels, 10, l2=1 / n))):
        fit()(feats[:10]).tolist()   # warm-up: cuBLAS start-up and the first kernels
        t = time.perf_counter()
        fit()(feats[:10]).tolist()
        out.append(f"{name} fit on {n} x 512 features: {time.perf_counter() - t:.2f} s")
    return out


def section_syncs(args, device, data):
    if device.type != "cuda":
        return ["host syncs: not applicable off CUDA"]
    cfg = config("cifar10", device, dataset="synthetic")
    x = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    s = common.build(cfg, device)
    gen = torch.Generator(device).manual_seed(0)
    step = lambda: common.train_step(s, s.model.views(x, gen), cfg.base_tau, 0)  # noqa: E731
    step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(20):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return [f"host syncs in 20 steps: {len(syncs)}"] + sorted(set(syncs))[:5]


def section_rerun(args, device, data):
    cfg = small(device, epochs=2, train_subset=128 if args.quick else 0)
    synthetic = runtime.make_synthetic()
    a, b = (common.train_byol(cfg, data=synthetic) for _ in range(2))
    same = all(x["loss"] == y["loss"] and x["probe_acc"] == y["probe_acc"] for x, y in zip(a, b))
    diff = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a[1:], b[1:]))

    class Stop(Exception):
        pass

    def stop_after_epoch_1(row):   # the checkpoint of epoch 1 is written before this is called
        if row["epoch"] == 1:
            raise Stop
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "run.pt"
        try:
            common.train_byol(cfg, data=synthetic, checkpoint=harness.Checkpoints(ckpt), on_epoch=stop_after_epoch_1)
        except Stop:
            pass
        resumed = common.train_byol(cfg, data=synthetic, checkpoint=harness.Checkpoints(ckpt))
    cont = resumed[-1]["loss"] == a[-1]["loss"]
    return [f"same seed twice: {'identical rows' if same else f'rows differ (largest relative loss difference {diff:.2g})'}",
            f"resumed from a checkpoint after epoch 1: {'the uninterrupted numbers' if cont else 'numbers differ'} "
            f"(loss {resumed[-1]['loss']:.6g} against {a[-1]['loss']:.6g})"]


def section_collapse(args, device, data):
    out, negs = [], {}
    for name in ("byol", "no_norm"):
        over = exp_table1_norms.VARIANTS[name]
        cfg = (small(device, epochs=2, **over) if args.quick else
               config("cifar10", device, epochs=2, dataset="cifar10" if data["real"] else "synthetic", **over))
        rows = common.train_byol(cfg, data=data["dict"] if not args.quick else runtime.make_synthetic())
        out.append(f"{name}: probe {rows[-1]['probe_acc']:.1f} (untrained {rows[0]['probe_acc']:.1f}), "
                   f"pos_cos {rows[-1]['pos_cos']:.4f}, neg_cos {rows[-1]['neg_cos']:.4f}")
        negs[name] = rows[-1]["neg_cos"]
    neg = negs["no_norm"]
    # the verdict in words: no_norm's negative cosine is the collapse (Table 1: ~1.0)
    if neg >= COLLAPSED:
        out.append(f"no_norm collapsed (neg_cos {neg:.4f} >= {COLLAPSED}), as in the blog's Table 1")
    else:
        out.append(f"no_norm did NOT collapse here (neg_cos {neg:.4f} < {COLLAPSED})"
                   + (": --quick's 2 tiny epochs on synthetic images check that the section runs, not the "
                      "finding; run without --quick to see it" if args.quick else ": the finding did not show"))
    return out


COLLAPSED = 0.99   # negative cosine at or above this: collapsed (the blog's collapsed rows are 0.9999)


SECTIONS = dict(env=section_env, smoke=section_smoke, speed=section_speed, epoch=section_epoch, probe=section_probe,
                syncs=section_syncs, rerun=section_rerun, collapse=section_collapse)


def get_parser():
    p = harness.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/gpu_report.txt", help="the report file (default runs/gpu_report.txt)")
    p.add_argument("--data-dir", default="", help="a folder holding cifar-10-batches-py/ (default: the usual places)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and synthetic images: checks the path in "
                   "seconds (CI)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        device = harness.get_device(args.device)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
    except (harness.UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    data = None
    why = "--quick"   # --quick always uses synthetic images, whether CIFAR-10 is there or not
    if not args.quick:
        try:
            source = str(harness.find_dataset("cifar10", args.data_dir))
            data = dict(dict=harness.load_data("cifar10", args.data_dir), real=True, source=source)
        except harness.UsageError as e:
            why = f"CIFAR-10 not usable: {str(e)[:120]}"
    if data is None:
        data = dict(dict=runtime.make_synthetic(n_train=1024 if args.quick else 50000, n_test=512 if args.quick else 10000),
                    real=False, why=why)
    lines = [f"gpu_report.py{' --quick' if args.quick else ''} on {device}, {time.strftime('%Y-%m-%d %H:%M')}"]
    failed = 0
    for name, fn in SECTIONS.items():
        t = time.perf_counter()
        try:
            body = fn(args, device, data)
        except Exception:
            failed += 1
            body = ["FAILED:"] + traceback.format_exc().strip().splitlines()[-6:]
        lines += [f"\n== {name} ({time.perf_counter() - t:.1f} s)"] + [f"  {x}" for x in body]
        out.write_text("\n".join(lines) + "\n")   # what is done so far survives an interruption
        print("\n".join(lines[-len(body) - 1:]), flush=True)
    print(f"\n-> {out} ({failed} section(s) failed)")
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
