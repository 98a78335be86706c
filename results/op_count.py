"""Counts the aten ops one training step launches (on the CPU; each is a kernel launch on CUDA),
by part: the two views' augmentation, the networks' forward and backward, the optimizer step and
the EMA. python results/op_count.py [preset] (default: cifar10, the GPU preset, synthetic data)."""
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
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
    mean, std = common.mean_std("synthetic", device)
    gen = torch.Generator().manual_seed(0)
    model = common.BYOL(cfg)
    opt = common.LARS(common.param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    views = common.view_settings(cfg)
    common.train_step(model, model, opt, *common.two_views(x, gen, mean, std, views=views), 0.99, False)  # warm
    parts = {}
    with Count() as c:
        v = common.two_views(x, gen, mean, std, views=views)
    parts["augment (two views)"] = sum(c.n.values())
    with Count() as c:
        out = model(*v)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
    parts["networks: forward + backward"] = sum(c.n.values())
    with Count() as c:
        opt.step()
    parts["optimizer step"] = sum(c.n.values())
    with Count() as c:
        common.ema_update_(model.target_encoder, model.online_encoder, 0.99)
        common.ema_update_(model.target_projector, model.online_projector, 0.99)
    parts["EMA"] = sum(c.n.values())
    for k, n in parts.items():
        print(f"{k:32s}{n:6d}")
    print(f"{'total':32s}{sum(parts.values()):6d}")


if __name__ == "__main__":
    main(*sys.argv[1:])
