"""Why train_byol flushes denormal floats on CPU: one 64-channel 3x3 conv, forward + backward,
batch 64 at 16x16, one thread, with normal values and with inputs and weights scaled by 1e-20
(products ~1e-40: denormal), without and with torch.set_flush_denormal(True).

    python results/denormal_conv.py | tee results/denormal_conv.txt
"""
import time

import torch

torch.set_num_threads(1)
x = torch.randn(64, 64, 16, 16).contiguous(memory_format=torch.channels_last)


def ms_per_step(scale, flush, steps=5):
    torch.set_flush_denormal(flush)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.zero_()
    xs = x * scale
    for _ in range(2):
        conv(xs).sum().backward()
    t = time.perf_counter()
    for _ in range(steps):
        conv(xs).sum().backward()
    return (time.perf_counter() - t) / steps * 1e3


for flush in (False, True):
    print(f"flush_denormal={flush}: normal {ms_per_step(1.0, flush):.1f} ms, "
          f"denormal {ms_per_step(1e-20, flush):.1f} ms")
