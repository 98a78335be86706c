"""The blog's augmentations (Appendix B = MoCo v2's) as batched ops on the training device, with
independent random parameters for every image and every view. Each op equals torchvision's
per-image functional op for the same parameters (test_common.py). augment() and two_views() draw
and apply them to a batch; common.BYOL.views calls them."""
import functools
import math

import torch
import torch.nn.functional as F

MEAN_STD = {   # per-channel input normalization: CIFAR-10's own; the blog used ImageNet's on STL-10
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "stl10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def mean_std(dataset, device):
    """Per-channel mean and std as (1, 3, 1, 1) device tensors."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in MEAN_STD[dataset])


def augment(x_u8, gen, mean, std, part=slice(None), size=None, fmt=torch.contiguous_format, **settings):
    """One random view of every image of a uint8 batch (of its part: a rank's share; the
    parameters are drawn for the whole batch, so a view does not depend on the split), size x size
    px (default: the images' size), in memory format fmt. settings: sample_aug_params' (scale, ...)."""
    params = sample_aug_params(len(x_u8), x_u8.shape[-1], gen, x_u8.device, **settings)
    return apply_aug(x_u8[part], {k: v[part] for k, v in params.items()}, mean, std, size).contiguous(memory_format=fmt)


def two_views(x_u8, gen, mean, std, part=slice(None), fmt=torch.contiguous_format, views=({}, {}),
              apply=None):
    """Two independent random views v, v' of a uint8 batch (of its part), in memory format fmt.
    The parameters are drawn view by view, as two augment() calls would, then applied to both views
    in one pass over a double batch: the same numbers in half the kernel launches. apply: apply_aug
    or its compiled version (compiled_apply_aug)."""
    n = len(x_u8)
    params = [sample_aug_params(n, x_u8.shape[-1], gen, x_u8.device, **v) for v in views]
    both = {k: torch.cat([p[k][part] for p in params]) for k in params[0]}
    x = x_u8[part]
    out = (apply or apply_aug)(torch.cat([x, x]), both, mean, std).contiguous(memory_format=fmt)
    return out.chunk(2)


@functools.cache
def compiled_apply_aug():
    """apply_aug through torch.compile, made once: ~370 small ops a step eager, 28 kernels compiled
    (results/op_count.txt)."""
    return torch.compile(apply_aug, dynamic=False)



def sample_aug_params(n, size, gen, device, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1),
                      p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0), p_solarize=0.0):
    """Per-image parameters, drawn like torchvision's RandomResizedCrop/ColorJitter/... do. The
    solarize draw comes last and only where p_solarize > 0, so the blog's views draw as before."""
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, device=device)
    # RandomResizedCrop: 10 tries of (area, log-uniform aspect), first valid one wins,
    # else the whole (square) image
    area = size * size * u(n, 10, lo=scale[0], hi=scale[1])
    aspect = torch.exp(u(n, 10, lo=math.log(ratio[0]), hi=math.log(ratio[1])))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = ok.int().argmax(1, keepdim=True)
    any_ok = ok.any(1)
    w = torch.where(any_ok, w.gather(1, first)[:, 0], torch.full_like(w[:, 0], size))
    h = torch.where(any_ok, h.gather(1, first)[:, 0], torch.full_like(h[:, 0], size))
    top = torch.floor(u(n) * (size - h + 1))
    left = torch.floor(u(n) * (size - w + 1))
    b, c, s, hue = jitter
    return dict(
        box=torch.stack([top, left, h, w], 1),                        # (n, 4) pixels
        flip=u(n) < 0.5,
        jitter=u(n) < p_jitter,
        factors=torch.stack([u(n, lo=1 - b, hi=1 + b), u(n, lo=1 - c, hi=1 + c),
                             u(n, lo=1 - s, hi=1 + s), u(n, lo=-hue, hi=hue)], 1),
        order=torch.argsort(u(n, 4), dim=1),                         # random op order per image
        gray=u(n) < p_gray,
        blur=u(n) < p_blur,
        sigma=u(n, lo=sigma[0], hi=sigma[1]),
        solarize=u(n) < p_solarize if p_solarize > 0 else torch.zeros(n, dtype=torch.bool, device=device))


def resized_crop_flip(img, box, flip, size):
    """Bilinear crop-and-resize of float images (n, 3, H, W) to size x size, per-image box
    (top, left, h, w) and horizontal flip, as one grid_sample. Sample points are clamped to
    the crop box, which is what torchvision's crop-then-resize does at the box's edges."""
    n, _, H, W = img.shape
    top, left, h, w = box.unbind(1)
    t = (torch.arange(size, device=img.device, dtype=img.dtype) + 0.5) / size   # (size,)
    ys = (top[:, None] + t * h[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    xs = (left[:, None] + t * w[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    gx = (2 * xs + 1) / W - 1                                        # align_corners=False
    gy = (2 * ys + 1) / H - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(img):
    """ITU-R 601 luma, torchvision's weights; (n, 3, H, W) -> (n, 1, H, W)."""
    return (0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])


def _blend(img, other, factor):
    return (factor * img + (1 - factor) * other).clamp(0, 1)


def adjust_hue(img, shift):
    """Rotate hue by shift (fraction of a turn, per image) via HSV, as torchvision does."""
    r, g, b = img.unbind(1)
    maxc, minc = img.max(1).values, img.min(1).values
    delta = maxc - minc
    sat = delta / torch.where(delta > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue / 6.0 + shift[:, None, None], 1.0)
    # HSV -> RGB in closed form: channel n = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    n = 5.0 - 2.0 * torch.arange(3, device=img.device, dtype=img.dtype)   # 5, 3, 1 for R, G, B
    k = torch.remainder(n[None, :, None, None] + 6 * hue[:, None], 6.0)
    return maxc[:, None] * (1 - sat[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def color_jitter(img, factors, order, apply):
    """ColorJitter(brightness, contrast, saturation, hue) in a random order per image (order[i]
    is a permutation of 0..3); images with apply=False are left untouched. Without a per-image
    loop and without host syncs: brightness, contrast and saturation are all blends
    f * img + (1 - f) * other (other = 0, the mean grey, the grey image), so each slot is one
    masked blend; hue, the costly op, runs once, between the blends before and after its slot."""
    col = (-1, 1, 1, 1)
    hue_slot = (order == 3).int().argmax(1)

    def blends(img, slots, before):
        for slot in slots:
            op = order[:, slot]
            take = apply & (op != 3) & ((slot < hue_slot) if before else (slot > hue_slot))
            gray = grayscale(img)
            other = torch.where((op == 0).view(col), torch.zeros_like(gray),
                                torch.where((op == 1).view(col), gray.mean((1, 2, 3), keepdim=True), gray))
            img = torch.where(take.view(col), _blend(img, other, factors.gather(1, op[:, None]).view(col)), img)
        return img
    img = blends(img, range(3), before=True)
    img = torch.where(apply.view(col), adjust_hue(img, factors[:, 3]), img)
    return blends(img, range(1, 4), before=False)


def gaussian_blur(img, sigma, apply, kernel_size):
    """Separable Gaussian blur with a per-image sigma and reflect padding (torchvision's
    kernel); images with apply=False get a delta kernel, i.e. are unchanged."""
    n, c, H, W = img.shape
    x = torch.arange(kernel_size, device=img.device, dtype=img.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (x == 0).to(img.dtype).expand_as(k)
    k = torch.where(apply[:, None], k, delta).repeat_interleave(c, 0)   # (n*c, K)
    p = kernel_size // 2
    out = F.pad(img.reshape(1, n * c, H, W), (p, p, p, p), mode="reflect")
    out = F.conv2d(out, k[:, None, None, :], groups=n * c)
    out = F.conv2d(out, k[:, None, :, None], groups=n * c)
    return out.reshape(n, c, H, W)


def blur_kernel_size(size):
    """Blur sigma is U[0.1, 2] in pixels at STL-10's 96 px (blog); we scale sigma with the image
    size (so 32 px CIFAR gets U[0.033, 0.67]) and cut the kernel at 3 sigma_max."""
    return 2 * math.ceil(3 * 2.0 * size / 96) + 1


def solarize(img):
    """The BYOL paper's solarization (its Table 6): x if x < 0.5 else 1 - x, on [0, 1] images."""
    return torch.where(img < 0.5, img, 1.0 - img)


def apply_aug(x_u8, params, mean, std, size=None):
    """uint8 (n, 3, H, W) + params -> normalized float views (n, 3, size, size), size default H."""
    size = size or x_u8.shape[-1]
    img = resized_crop_flip(x_u8.float() / 255, params["box"], params["flip"], size)
    img = color_jitter(img, params["factors"], params["order"], params["jitter"])
    img = torch.where(params["gray"][:, None, None, None], grayscale(img).expand_as(img), img)
    img = gaussian_blur(img, params["sigma"] * size / 96, params["blur"], blur_kernel_size(size))
    img = torch.where(params["solarize"][:, None, None, None], solarize(img), img)
    return normalize(img, mean, std)


def normalize(img, mean, std):
    """mean, std: (1, 3, 1, 1) tensors on img's device (mean_std)."""
    return (img - mean) / std
