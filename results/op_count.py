"""Counts the aten ops one training step launches (on the CPU; each is a kernel launch on CUDA),
by part: the two views' augmentation, the networks' forward and backward, the optimizer step and
the EMA. The augmentation is counted three ways: as two augment() calls (the code before
two_views made one pass), as two_views' one pass, and compiled (--compile; the kernels inductor
generates for the CPU, plus the ops it leaves to aten; its CUDA count may differ).
python results/op_count.py [preset] (default: cifar10, the GPU preset, synthetic data; the
compile time printed is inductor's, cold with an empty TORCHINDUCTOR_CACHE_DIR, as committed).
Its output is committed as results/op_count.txt."""
import sys
import time
from collections import Counter

import torch
from torch._inductor import metrics
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
import augment  # noqa: E402
import common  # noqa: E402
import exp_table1_norms  # noqa: E402


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main(preset="cifar10"):
    cfg = common.Config(**{**exp_table1_norms.PRESETS[preset], "dataset": "synthetic", "device": "cpu",
                           "batch_size": 32, "width": 8})
    device = torch.device("cpu")
    x = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8)
    setup = common.build(cfg, device)
    model = setup.model.to(memory_format=torch.contiguous_format)   # counted as committed: no channels_last
    opt, mean, std, views = setup.opt, model.mean, model.std, common.view_settings(cfg)
    gen = torch.Generator().manual_seed(0)
    common.train_step(setup, list(augment.two_views(x, gen, mean, std, views=views)), 0.99, 0)  # warm
    parts = {}
    with Count() as c:
        [augment.augment(x, gen, mean, std, **view) for view in views]
    before = sum(c.n.values())
    with Count() as c:
        v = list(augment.two_views(x, gen, mean, std, views=views))
    parts["augment (two views, one pass)"] = sum(c.n.values())
    with Count() as c:
        out = model(v)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
    parts["networks: forward + backward"] = sum(c.n.values())
    with Count() as c:
        opt.step()
    parts["optimizer step"] = sum(c.n.values())
    with Count() as c:
        model.update_target(0.99, 0)
    parts["EMA"] = sum(c.n.values())
    for k, n in parts.items():
        print(f"{k:36s}{n:6d}")
    print(f"{'total':36s}{sum(parts.values()):6d}")
    print(f"{'augment as two augment() calls':36s}{before:6d}")
    with Count() as c:   # the parameter draws stay eager under --compile (they take a generator)
        params = [augment.sample_aug_params(len(x), x.shape[-1], gen, device, **view) for view in views]
    draws = sum(c.n.values())
    both = {k: torch.cat([p[k] for p in params]) for k in params[0]}
    compiled = torch.compile(augment.apply_aug, dynamic=False, fullgraph=True)
    metrics.reset()
    t = time.perf_counter()
    out = compiled(torch.cat([x, x]), both, mean, std)
    seconds = time.perf_counter() - t
    diff = (out - augment.apply_aug(torch.cat([x, x]), both, mean, std)).abs().max().item()
    print(f"{'augment compiled: draws (eager)':36s}{draws:6d}")
    print(f"{'  + generated kernels':36s}{metrics.generated_kernel_count:6d}")
    print("  + the blur's 2 grouped convolutions, which inductor leaves to aten (TORCH_LOGS=output_code)")
    print(f"  compile {seconds:.0f} s on {torch.get_num_threads()} thread(s); largest difference to eager {diff:.2g}")


if __name__ == "__main__":
    main(*sys.argv[1:])
