"""Tests of common.py and the exp_*.py scripts. CPU only, no downloads: pytest -q"""
import csv
import dataclasses
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF

import common

ROOT = Path(__file__).resolve().parent
SMALL = common.Config(dataset="synthetic", width=4, mlp_hidden_dim=32, proj_dim=16, batch_size=64,
                      epochs=2, queue_size=256, device="cpu", lr=0.2)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so a threshold that passes once always passes."""
    torch.manual_seed(0)
    np.random.seed(0)


# ------------------------------------------------------------------------------ models

@pytest.mark.parametrize("norm", common.MLP_NORMS)
def test_mlp_shapes_and_norm_after_first_linear_only(norm):
    mlp = common.build_mlp(64, 128, 16, norm)
    assert mlp(torch.randn(8, 64)).shape == (8, 16)
    kinds = [type(m) for m in mlp]
    assert kinds[0] is (common.WSLinear if norm == "gn_ws" else nn.Linear)
    assert kinds[-1] is nn.Linear and kinds[2] is nn.ReLU
    parts = common.BatchNormParts
    expected = {"none": nn.Identity, "bn": nn.BatchNorm1d, "ln": nn.LayerNorm, "gn": nn.GroupNorm,
                "gn_ws": nn.GroupNorm, "bn_noaffine": parts, "bn_center": parts, "bn_scale": parts}[norm]
    assert kinds[1] is expected
    n_norms = sum(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, parts)) for m in mlp)
    assert n_norms == (0 if norm == "none" else 1)
    # ghost BN: plain "bn" with a group size becomes BatchNormParts with that group
    ghost = common.build_mlp(64, 128, 16, "bn", bn_group=4)[1]
    assert type(ghost) is parts and ghost.group == 4 and ghost.weight is not None


def test_mlp_depth_as_the_blogs_mlp():
    assert isinstance(common.build_mlp(16, 32, 16, "bn", num_layers=0), nn.Identity)
    one = common.build_mlp(16, 32, 8, "bn", num_layers=1)
    assert [type(m) for m in one] == [nn.Linear] and one[0].out_features == 8
    three = common.build_mlp(16, 32, 8, "ln", num_layers=3)
    assert [type(m) for m in three] == [nn.Linear, nn.LayerNorm, nn.ReLU] * 2 + [nn.Linear]
    assert three(torch.randn(4, 16)).shape == (4, 8)
    # no predictor: p = z, and the loss still gets gradients through the projector
    model = common.BYOL(dataclasses.replace(SMALL, pred_layers=0))
    z, p = model.online(torch.randn(8, 3, 32, 32))
    assert p is z and not list(model.predictor.parameters())
    model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))["loss"].backward()
    assert model.online_projector[0].weight.grad.abs().sum() > 0
    # no projector: z = y, the predictor maps y's dims
    model = common.BYOL(dataclasses.replace(SMALL, proj_layers=0))
    assert model.online(torch.randn(8, 3, 32, 32))[1].shape == (8, model.online_encoder.out_dim)


def test_a_script_supplies_its_own_parameter_groups_and_model():
    """groups_fn with an lr multiplier: the predictor's lr is 10x the schedule's at every step,
    and logged; model_fn replaces the model (here: a BYOL with a frozen predictor)."""
    data = common.make_synthetic(128, 64)
    cfg = dataclasses.replace(SMALL, epochs=2, eval_every=0, lr=0.2, schedule_epochs=4)

    def fast(model, cfg):
        return common.param_groups(model, cfg, lr_mult={"predictor.": 10.0})
    rows = common.train_byol(cfg, data=data, groups_fn=fast)
    for r in rows[1:]:
        assert r["lr:predictor"] == pytest.approx(10 * r["lr"]) and r["lr"] < 0.2   # follows the cosine
    groups = fast(common.BYOL(cfg), cfg)
    assert {g.get("label") for g in groups} == {None, "predictor"}
    assert all(n.startswith("predictor.") == (g.get("lr_mult") == 10.0) for g in groups for n in g["names"])

    def frozen_predictor(cfg):
        model = common.BYOL(cfg)
        model.predictor.requires_grad_(False)
        return model
    seen = []
    common.train_byol(dataclasses.replace(cfg, epochs=1), data=data, model_fn=frozen_predictor,
                      groups_fn=lambda m, c: seen.append(m) or common.param_groups(m, c))
    common.set_seed(cfg.seed)                               # train_byol's seed: the same init
    init = frozen_predictor(cfg)
    assert all(torch.equal(p, q) for p, q in zip(seen[0].predictor.parameters(), init.predictor.parameters()))
    assert not torch.equal(seen[0].online_projector[0].weight, init.online_projector[0].weight)   # it trained


def test_batchnorm_parts_with_the_whole_batch_is_batchnorm():
    x = torch.randn(16, 6) * 3 + 1
    mods = nn.BatchNorm1d(6), common.BatchNormParts(6, group=0), common.BatchNormParts(6, group=16)
    with torch.no_grad():   # the same non-trivial affine in all three
        for m in mods:
            m.weight.copy_(torch.linspace(0.5, 2, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    outs, grads = [], []
    for m in mods:
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.arange(6.0)).pow(2).sum().backward()   # gradients flow through the statistics
        outs.append(y)
        grads.append(xi.grad)
    for y, g in zip(outs[1:], grads[1:]):
        assert torch.allclose(y, outs[0], atol=1e-5) and torch.allclose(g, grads[0], atol=1e-4)


def test_ghost_groups_and_the_parts_of_batchnorm():
    x = torch.randn(32, 5) * 2 + 3
    k = 8
    ghost = common.BatchNormParts(5, group=k, affine=False)(x)
    per_group = torch.cat([common.BatchNormParts(5, affine=False)(c) for c in x.split(k)])
    assert torch.allclose(ghost, per_group, atol=1e-6)
    assert not torch.allclose(ghost, common.BatchNormParts(5, affine=False)(x), atol=1e-2)
    groups = x.view(-1, k, 5)
    center = common.BatchNormParts(5, group=k, scale=False, affine=False)(x).view(-1, k, 5)
    assert torch.allclose(center.mean(1), torch.zeros(4, 5), atol=1e-5)   # zero mean per group
    assert torch.allclose(center, groups - groups.mean(1, keepdim=True), atol=1e-6)   # nothing else
    scale = common.BatchNormParts(5, group=k, center=False, affine=False)(x).view(-1, k, 5)
    std = groups.var(1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    assert torch.allclose(scale, groups / std, atol=1e-5)   # divided by the std, mean kept
    assert scale.mean(1).abs().mean() > 1.0   # x has mean 3, std 2: the mean survives as ~1.5
    with pytest.raises(ValueError, match="multiple"):
        common.BatchNormParts(5, group=3)(x)


def test_mlp_unknown_norm_raises():
    with pytest.raises(common.UsageError):
        common.build_mlp(4, 8, 4, "batchnorm")


@pytest.mark.parametrize("stem,size,out_hw", [("cifar", 32, 32), ("imagenet", 96, 24)])
@pytest.mark.parametrize("norm", ["bn", "gn", "gn_ws", "none"])
def test_resnet_shapes_and_norms(stem, size, out_hw, norm):
    net = common.ResNet18(width=8, stem=stem, norm=norm)
    assert net(torch.randn(2, 3, size, size)).shape == (2, 64)
    # stage-1 resolution: stride-1 CIFAR stem vs 7x7/2 conv + maxpool ImageNet stem
    assert net.layer1(net.maxpool(net.conv1(torch.randn(1, 3, size, size)))).shape[-1] == out_hw
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    has_gn = any(isinstance(m, nn.GroupNorm) for m in net.modules())
    has_ws = any(isinstance(m, common.WSConv2d) for m in net.modules())
    assert (has_bn, has_gn, has_ws) == (norm == "bn", norm in ("gn", "gn_ws"), norm == "gn_ws")
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 20   # 17 + 3 shortcuts


def test_weight_standardized_conv_is_invariant_to_weight_scale_and_shift():
    conv = common.WSConv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(3.0)
    assert torch.allclose(conv(x), y, rtol=1e-3, atol=1e-3)   # up to the 1e-5 in the std


def test_target_is_a_copy_without_gradient_and_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = common.BYOL(SMALL)
    v1, v2 = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    for a, b in zip(model.online_encoder.parameters(), model.target_encoder.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    out = model(v1, v2)
    out["loss"].backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is None for p in model.target_projector.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())
    assert model.online_encoder.conv1.weight.grad.abs().sum() > 0
    # the blog's loss: mean(1 - cos(q(z_1), z'_2)) + mean(1 - cos(q(z_2), z'_1)), same BN batches
    with torch.no_grad():
        _, p1 = model.online(v1)
        _, p2 = model.online(v2)
        t1, t2 = model.target(v1), model.target(v2)
    cos = nn.functional.cosine_similarity
    hand = (1 - cos(p1, t2)).mean() + (1 - cos(p2, t1)).mean()
    assert torch.allclose(out["loss"], hand, atol=1e-5)


def test_views_are_separate_batchnorm_batches():
    """Forwarding the two views together would mix their BN statistics; we must not."""
    torch.manual_seed(0)
    model = common.BYOL(SMALL)
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32) * 3 + 1
    z1_alone, _ = model.online(v1)
    z1_joint, _ = model.online(torch.cat([v1, v2]))
    assert not torch.allclose(z1_alone, z1_joint[:8], atol=1e-3)
    # ... and BYOL.forward uses the separate calls: its diagnostics equal those of z1_alone
    with torch.no_grad():
        z2_alone, _ = model.online(v2)
        expected = common.collapse_stats(z1_alone, z2_alone, model.target(v1), model.target(v2))
    assert torch.allclose(model(v1, v2)["z_std"], expected["z_std"], atol=1e-6)


def test_info_nce_and_queue():
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, objective="contrastive", queue_size=8, proj_dim=4, temperature=0.5)
    model = common.BYOL(cfg)
    q = nn.functional.normalize(torch.randn(3, 4), dim=1)
    k = nn.functional.normalize(torch.randn(3, 4), dim=1)
    # hand: -log softmax of the positive among [q.k, q.queue_1..8] / T
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue.T], 1) / 0.5
    hand = -(logits[:, 0] - torch.logsumexp(logits, 1)).mean()
    assert torch.allclose(model.info_nce(q, k), hand, atol=1e-6)
    # ring buffer: 3 + 3 + 3 keys into 8 slots wrap around
    keys = [torch.full((3, 4), float(i)) for i in range(3)]
    for key in keys:
        model.enqueue_(key)
    assert model.queue_ptr.item() == 1
    assert model.queue[:, 0].tolist() == [2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]


def test_collapse_stats():
    z = torch.randn(1, 8).repeat(16, 1)   # every projection the same: collapse
    s = common.collapse_stats(z, z, z, z)
    assert s["pos_cos"].item() == pytest.approx(1, abs=1e-5) and s["neg_cos"].item() == pytest.approx(1, abs=1e-5)
    assert s["z_std"].item() == pytest.approx(0, abs=1e-6)
    e = torch.eye(8)                       # orthogonal projections, positives identical
    s = common.collapse_stats(e, e, e, e)
    assert s["pos_cos"].item() == pytest.approx(1) and s["neg_cos"].item() == pytest.approx(0)


# ------------------------------------------------------------------------ EMA, schedules

def test_ema_update_maths():
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        target.weight.copy_(torch.tensor([3.0, 2.0, 1.0]))
        online.running_mean.fill_(5.0)
    common.ema_update_(target, online, 1.0)
    assert target.weight.tolist() == [3.0, 2.0, 1.0]
    common.ema_update_(target, online, 0.75)
    assert torch.allclose(target.weight, torch.tensor([2.5, 2.0, 1.5]))
    assert target.running_mean.tolist() == [5.0] * 3
    common.ema_update_(target, online, 0.0)
    assert torch.equal(target.weight, online.weight)


def test_tau_and_lr_schedules():
    assert common.tau_at(0, 100, 0.996, "cosine") == pytest.approx(0.996)
    assert common.tau_at(50, 100, 0.996, "cosine") == pytest.approx(0.998)
    assert common.tau_at(100, 100, 0.996, "cosine") == pytest.approx(1.0)
    assert common.tau_at(70, 100, 0.99, "constant") == 0.99
    cfg = common.Config(lr=1.0, epochs=10, warmup_epochs=1)
    assert common.lr_at(0, 10, cfg) == pytest.approx(0.1)
    assert common.lr_at(9, 10, cfg) == pytest.approx(1.0)
    assert common.lr_at(10, 10, cfg) == pytest.approx(1.0)
    assert common.lr_at(55, 10, cfg) == pytest.approx(0.5)
    # the blog: cosine over 320 epochs, stopped after 10 -> lr barely moves
    blog = common.Config(lr=0.8, epochs=10, schedule_epochs=320)
    assert common.lr_at(10 * 410 - 1, 410, blog) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 10 / 320)), rel=1e-3)


# ----------------------------------------------------------------------------- LARS

def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))          # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    opt = common.LARS([dict(params=[w], lars=True, weight_decay=0.1),
                       dict(params=[b], lars=False, weight_decay=0.0)], lr=2.0, momentum=0.9, eta=0.01)
    opt.step()
    u = torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]])   # g + wd w = [0.9, 1.2], |u| = 1.5
    trust = 0.01 * 5.0 / 1.5
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 2.0 * trust * u)
    assert b.item() == pytest.approx(1.0 - 2.0 * 0.5)      # excluded: plain SGD, no decay
    assert opt.state[w]["trust"].item() == pytest.approx(trust)
    # second step: momentum buffer = 0.9 * previous + new adapted update
    w.grad = torch.tensor([[0.6, 0.8]])
    before = w.detach().clone()
    opt.step()
    u2 = torch.tensor([[0.6, 0.8]]) + 0.1 * before
    buf = 0.9 * trust * u + 0.01 * before.norm() / u2.norm() * u2
    assert torch.allclose(w, before - 2.0 * buf, atol=1e-6)


def test_lars_blog_form_matches_hand_computation():
    """The blog's lars.py: trust = eta |w| / (|g| + wd |w|), and lr x trust inside the momentum."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))          # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    g = torch.tensor([[0.8, -0.6]])                        # orthogonal to w, as in front of a norm layer
    w.grad, b.grad = g.clone(), torch.tensor([0.5])
    opt = common.LARS([dict(params=[w], lars=True, weight_decay=0.1),
                       dict(params=[b], lars=False, weight_decay=0.0)], lr=2.0, momentum=0.9, eta=0.01,
                      form="blog")
    opt.step()
    trust = 0.01 * 5.0 / (1.0 + 0.1 * 5.0)                # |g| = 1: 0.01 * 5 / 1.5
    u = g + 0.1 * torch.tensor([[3.0, 4.0]])
    assert opt.state[w]["trust"].item() == pytest.approx(trust)
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 2.0 * trust * u)
    assert b.item() == pytest.approx(1.0 - 2.0 * 0.5)
    # DeepMind's form divides by |g + wd w| = sqrt(1 + 0.25) instead: a different trust here
    assert 0.01 * 5.0 / u.norm().item() == pytest.approx(trust * 1.5 / 1.25 ** 0.5)
    # second step with another lr: the old buffer keeps the lr it was made with
    opt.param_groups[0]["lr"] = 1.0
    before = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    u2 = g + 0.1 * before
    trust2 = 0.01 * before.norm() / (g.norm() + 0.1 * before.norm())
    assert torch.allclose(w, before - (0.9 * 2.0 * trust * u + 1.0 * trust2 * u2), atol=1e-6)


def test_lars_without_adaptation_equals_torch_sgd():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = common.LARS([dict(params=list(a.parameters()), lars=False, weight_decay=1e-2)], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        x = torch.randn(4, 5)
        for net, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_param_groups_exclusions_and_per_module_lars():
    model = common.BYOL(SMALL)

    def adapted(cfg):
        return {n for g in common.param_groups(model, cfg) if g["lars"] for n in g["names"]}

    def decayed(cfg):
        return {n for g in common.param_groups(model, cfg) if g["weight_decay"] > 0 for n in g["names"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("target") for n in trainable)
    sgd = dataclasses.replace(SMALL, optimizer="sgd")
    assert adapted(sgd) == set() and decayed(sgd) == trainable          # blog: decay on everything
    lars = dataclasses.replace(SMALL, optimizer="lars")
    matrices = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1}
    assert adapted(lars) == matrices and decayed(lars) == matrices       # no bias / norm params
    l12 = adapted(dataclasses.replace(lars, lars_params="layer12"))
    assert l12 and all(n.startswith(("online_encoder.layer1.", "online_encoder.layer2.")) for n in l12)
    assert l12 == {n for n in matrices if ".layer1." in n or ".layer2." in n}
    mlp = adapted(dataclasses.replace(lars, lars_params="mlp"))
    assert mlp == {n for n in matrices if n.startswith(("online_projector", "predictor"))} and len(mlp) == 4


# ---------------------------------------------------------------------- augmentations

def _params(n, seed=0, size=32):
    return common.sample_aug_params(n, size, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_augmentation_is_drawn_per_image_and_per_view():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(64, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    mean, std = common.mean_std("synthetic", "cpu")
    v1 = common.augment(x, gen, mean, std)
    v2 = common.augment(x, gen, mean, std)
    assert v1.shape == (64, 3, 32, 32)
    flat = v1.flatten(1)
    distinct = torch.cdist(flat, flat) + torch.eye(64) * 1e9
    assert distinct.min() > 1e-3                    # no two copies of the image got the same view
    assert (v1 - v2).flatten(1).norm(dim=1).min() > 1e-3


def test_augmentation_parameter_statistics():
    p = _params(20000)
    top, left, h, w = p["box"].unbind(1)
    area = h * w / 32 ** 2
    assert area.min() >= 0.18 and area.max() <= 1.0            # scale (0.2, 1), after rounding
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert 0.5 < area.mean() < 0.65
    aspect = (w / h).log()
    assert aspect.abs().max() <= math.log(4 / 3) + 0.2 and abs(aspect.mean()) < 0.01
    for key, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        assert abs(p[key].float().mean().item() - prob) < 0.015, key
    f = p["factors"]
    for i, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        assert f[:, i].min() >= lo and f[:, i].max() <= hi and abs(f[:, i].mean() - (lo + hi) / 2) < 0.01
    assert (p["sigma"] >= 0.1).all() and (p["sigma"] <= 2.0).all()
    # every op order is a permutation, and all 24 occur about equally often
    assert (p["order"].sort(1).values == torch.arange(4)).all()
    counts = torch.unique(p["order"], dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 20000 / 24 * 0.8


def _images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_crop_and_flip_match_torchvision():
    img = _images()
    p = _params(6, seed=1)
    p["flip"] = torch.tensor([True, False] * 3)
    ours = common.resized_crop_flip(img, p["box"], p["flip"], 32)
    for i in range(6):
        t, l, h, w = (int(v) for v in p["box"][i])
        ref = TF.resized_crop(img[i], t, l, h, w, [32, 32], antialias=True)
        ref = TF.hflip(ref) if p["flip"][i] else ref
        assert torch.allclose(ours[i], ref, atol=1e-5), i


def test_color_ops_match_torchvision():
    img = _images(8)
    f = torch.linspace(0.6, 1.4, 8)
    h = torch.linspace(-0.1, 0.1, 8)
    for op, ref_fn, factor in ((0, TF.adjust_brightness, f), (1, TF.adjust_contrast, f),
                               (2, TF.adjust_saturation, f), (3, TF.adjust_hue, h)):
        factors = torch.ones(8, 4)
        factors[:, 3] = 0
        factors[:, op] = factor
        order = torch.tensor([op, *[o for o in range(4) if o != op]]).repeat(8, 1)
        ours = common.color_jitter(img, factors, order, torch.ones(8, dtype=torch.bool))
        for i in range(8):
            assert torch.allclose(ours[i], ref_fn(img[i], factor[i].item()), atol=1e-5), (op, i)
    gray = common.grayscale(img).expand_as(img)
    assert torch.allclose(gray, TF.rgb_to_grayscale(img, 3), atol=1e-6)


def test_color_jitter_random_order_matches_sequential_torchvision():
    img = _images(12)
    p = _params(12, seed=3)
    p["jitter"][:2] = False
    ours = common.color_jitter(img, p["factors"], p["order"], p["jitter"])
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(12):
        ref = img[i]
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                ref = fns[op](ref, p["factors"][i, op].item())
        assert torch.allclose(ours[i], ref, atol=1e-5), i


@pytest.mark.parametrize("size", [32, 96])
def test_blur_matches_torchvision(size):
    img = _images(4, size)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    apply = torch.tensor([True, True, False, True])
    k = common.blur_kernel_size(size)
    ours = common.gaussian_blur(img, sigma, apply, k)
    for i in range(4):
        ref = TF.gaussian_blur(img[i], [k, k], [sigma[i].item()] * 2) if apply[i] else img[i]
        assert torch.allclose(ours[i], ref, atol=1e-5), i


# ----------------------------------------------------------------------------- probe

def test_logreg_recovers_a_known_linear_signal():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(20, 5, generator=g)
    scales = torch.linspace(0.1, 10, 20)                  # features of very unequal scale
    x = torch.randn(3000, 20, generator=g) * scales
    y = ((x / scales) @ w_true).argmax(1)
    predict = common.fit_logreg(x[:2000], y[:2000], 5, l2=1 / 2000)
    acc = (predict(x[2000:]) == y[2000:]).float().mean().item()
    assert acc > 0.95
    shuffled = common.fit_logreg(x[:2000], y[:2000][torch.randperm(2000, generator=g)], 5, l2=1 / 2000)
    assert (shuffled(x[2000:]) == y[2000:]).float().mean().item() < 0.4


def test_blog_probe_matches_sklearn_liblinear():
    """fit_liblinear against the blog's own instrument (sklearn liblinear, one-vs-rest, C=1, raw
    features) on healthy features and on collapsed ones (a constant plus 1e-3 x the signal),
    where the standardized fit sees through the collapse and the blog's does not."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier   # sklearn >= 1.7 no longer does OvR by itself
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(4000, 64, generator=g)
    y = (signal @ torch.randn(64, 10, generator=g) + 2 * torch.randn(4000, 10, generator=g)).argmax(1)
    healthy = torch.relu(signal + 0.5)
    collapsed = torch.rand(64, generator=g) * 2 + 1e-3 * signal
    accs = {}
    for name, x in (("healthy", healthy), ("collapsed", collapsed)):
        ours = common.fit_liblinear(x[:2000], y[:2000], 10)
        acc = 100 * (ours(x[2000:]) == y[2000:]).double().mean().item()
        sk = OneVsRestClassifier(LogisticRegression(solver="liblinear", max_iter=100)).fit(x[:2000].numpy(), y[:2000].numpy())
        assert abs(acc - 100 * (sk.predict(x[2000:].numpy()) == y[2000:].numpy()).mean()) <= 1.0, name
        std = common.fit_logreg(x[:2000], y[:2000], 10, l2=1 / 2000)
        accs[name] = acc, 100 * (std(x[2000:]) == y[2000:]).double().mean().item()
    assert accs["healthy"][0] > 40 and accs["collapsed"][0] < 20      # raw features: collapse shows
    assert accs["collapsed"][1] > 40                                   # standardized: scale-invariant


def test_probe_features_are_fp32_under_bf16():
    data = common.make_synthetic(64, 256)
    enc = common.BYOL(SMALL).online_encoder
    cpu = torch.device("cpu")
    fp32 = common.linear_probe(enc, data, dataclasses.replace(SMALL, precision="fp32"), cpu)
    assert common.linear_probe(enc, data, dataclasses.replace(SMALL, precision="bf16"), cpu) == fp32


def test_probe_does_not_touch_the_encoder():
    data = common.make_synthetic(64, 64)
    model = common.BYOL(SMALL)
    enc = model.online_encoder.train()
    enc(torch.randn(8, 3, 32, 32))             # non-trivial running stats
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    for probe_bn in ("running", "recompute"):
        cfg = dataclasses.replace(SMALL, probe_bn=probe_bn)
        acc = common.linear_probe(enc, data, cfg, torch.device("cpu"))
        assert set(acc) == {"liblinear", "standardized"} and all(0 <= a <= 100 for a in acc.values())
        assert enc.training
        for k, v in enc.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_recomputed_bn_stats_are_the_data_statistics():
    net = common.ResNet18(width=4, stem="cifar", norm="bn")
    imgs = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    m, s = common.mean_std("synthetic", "cpu")
    new = common.recompute_bn_stats(net, imgs, m, s, torch.device("cpu"), batch_size=20)
    x = common.normalize(imgs.float() / 255, m, s)
    first = nn.functional.conv2d(x, net.conv1.weight, padding=1)
    assert torch.allclose(new.bn1.running_mean, first.mean((0, 2, 3)), atol=1e-4)
    assert net.bn1.running_mean.abs().sum() == 0   # the original is untouched


# ------------------------------------------------------------------------ data loaders

def _write_cifar(folder, n=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n)),
             b"batch_label": b"x", b"filenames": [b"f"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)


def test_cifar_loader_and_errors(tmp_path):
    _write_cifar(tmp_path / common.CIFAR_DIR)
    d = common.load_dataset("cifar10", str(tmp_path))
    assert d["train_x"].shape == (100, 3, 32, 32) and d["train_x"].dtype == torch.uint8
    assert d["test_x"].shape == (20, 3, 32, 32) and d["test_y"].dtype == torch.int64
    raw = pickle.load(open(tmp_path / common.CIFAR_DIR / "data_batch_1", "rb"), encoding="bytes")
    assert d["train_x"][0, 1, 0, 0] == raw[b"data"][0, 1024]     # planar R, G, B
    with pytest.raises(common.UsageError, match="looked in"):
        common.load_dataset("cifar10", str(tmp_path / "nowhere"))
    (tmp_path / common.CIFAR_DIR / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(common.UsageError, match="unreadable"):
        common.load_dataset("cifar10", str(tmp_path))


def test_stl10_loader_reads_the_binary_layout(tmp_path):
    folder = tmp_path / common.STL_DIR
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for s, n in
              (("train", 4), ("test", 6), ("unlabeled", 3))}
    for split, x in images.items():
        # STL-10 stores (N, C, W, H): column-major per channel
        x.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
    for split, n in (("train", 4), ("test", 6)):
        np.arange(1, n + 1, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    d = common.load_dataset("stl10", str(tmp_path))
    assert d["pretrain_x"].shape == (7, 3, 96, 96)
    assert torch.equal(d["test_x"], torch.from_numpy(images["test"]))
    assert torch.equal(d["pretrain_x"][4:], torch.from_numpy(images["unlabeled"]))
    assert d["train_y"].tolist() == [0, 1, 2, 3]                 # 1..10 on disk -> 0..9
    (folder / "test_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(common.UsageError, match="whole number"):
        common.load_dataset("stl10", str(tmp_path))


# ------------------------------------------------------------------- training loop

def test_seeded_training_is_reproducible_and_seed_dependent():
    data = common.make_synthetic(256, 128)
    cfg = dataclasses.replace(SMALL, epochs=1, eval_every=1)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    a = strip(common.train_byol(cfg, data=data))
    b = strip(common.train_byol(cfg, data=data))
    c = strip(common.train_byol(dataclasses.replace(cfg, seed=1), data=data))
    assert a == b
    assert a[-1]["loss"] != c[-1]["loss"]
    assert [r["epoch"] for r in a] == [0, 1] and a[0]["loss"] is None and a[1]["probe_acc"] is not None


AVX2_STEP = """
import torch, common
torch.set_num_threads(1)   # one thread: the out-of-bounds write crashes instead of hanging
cfg = common.Config(dataset="synthetic", width=4, mlp_hidden_dim=32, proj_dim=16, batch_size=64, epochs=1,
                    train_subset=64, eval_every=0, device="cpu")
rows = common.train_byol(cfg, data=common.make_synthetic(64, 64))
print("loss", rows[-1]["loss"])
"""


def test_no_avx2_crash_at_a_narrow_width(tmp_path):
    """Regression: at width 4 the stride-2 1x1 shortcut conv has 4 input channels; in channels_last
    its weight gradient ran oneDNN's jit_1x1:avx2 kernel, which writes out of bounds (a double
    free here, a hang with several threads). Capping the ISA at AVX2 picks that kernel on any
    x86 CPU. Before the fix this subprocess died with SIGABRT."""
    (tmp_path / "step.py").write_text(AVX2_STEP)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(tmp_path / "step.py")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert math.isfinite(float(r.stdout.split()[-1]))


def test_conv_format_channels_last_only_where_safe():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert common.conv_format(cpu, 16) == common.conv_format(cpu, 64) == torch.channels_last
    assert common.conv_format(cpu, 4) == common.conv_format(cpu, 12) == torch.contiguous_format
    assert common.conv_format(cuda, 4) == torch.channels_last


def test_image_size_area_averages_every_split():
    data = common.make_synthetic(8, 8)
    small = common.resize_images(data, 16)
    assert small["pretrain_x"].shape == (8, 3, 16, 16) and small["test_x"].shape == (8, 3, 16, 16)
    assert torch.equal(small["test_y"], data["test_y"])
    blocks = data["train_x"].float().view(8, 3, 16, 2, 16, 2).mean((3, 5))
    assert (small["train_x"].float() - blocks).abs().max() <= 0.5   # the 2x2 mean, rounded
    rows = common.train_byol(dataclasses.replace(SMALL, image_size=16, epochs=1), data=common.make_synthetic(64, 64))
    assert math.isfinite(rows[-1]["loss"]) and rows[-1]["probe_acc"] is not None


def test_cpu_training_flushes_denormal_floats():
    """Decayed weights of a collapsed run can underflow into denormals, ~90x slower on a CPU."""
    torch.set_flush_denormal(False)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
    common.train_byol(dataclasses.replace(SMALL, epochs=0), data=common.make_synthetic(64, 64))
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_training_learns_on_synthetic_data():
    """BYOL with BN MLPs lowers its loss and its features beat the untrained ones."""
    data = common.make_synthetic(512, 1024)
    rows = common.train_byol(dataclasses.replace(SMALL, width=8, epochs=5, eval_every=5, lr=0.4), data=data)
    assert rows[-1]["loss"] < rows[1]["loss"]
    assert rows[-1]["probe_acc"] > rows[0]["probe_acc"] + 10   # measured: +22 (seed 0), +43 (seed 1)


def test_bad_config_values_raise():
    for bad in (dict(epochs=-1), dict(proj_norm="batch"), dict(batch_size=0), dict(base_tau=1.5),
                dict(objective="contrastive", queue_size=8), dict(mlp_bn_group=1), dict(mlp_bn_group=48),
                dict(mlp_bn_group=-2)):
        with pytest.raises(common.UsageError):
            common.check_config(dataclasses.replace(SMALL, **bad))
    with pytest.raises(common.UsageError, match="batch_size"):
        common.train_byol(dataclasses.replace(SMALL, batch_size=5000), data=common.make_synthetic(64, 64))


# ------------------------------------------------------------------------ the scripts

SCRIPTS = sorted(p.name for p in [*ROOT.glob("exp_*.py"), *ROOT.glob("ablation_*.py")])


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_smoke_writes_the_csv(script, tmp_path):
    r = _run([str(ROOT / script), "--smoke", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    (csv_path,) = tmp_path.glob("*_smoke.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert set(common.COLUMNS) <= set(rows[0])
    mod = __import__(script[:-3])
    assert {r["variant"] for r in rows} == set(mod.VARIANTS)
    for v in mod.VARIANTS:
        epochs = [int(r["epoch"]) for r in rows if r["variant"] == v]
        assert epochs == list(range(max(epochs) + 1))
        last = [r for r in rows if r["variant"] == v][-1]
        assert last["probe_acc"] != ""
    # rerunning reuses the finished runs instead of duplicating them
    r = _run([str(ROOT / script), "--smoke", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0 and f"reused {len(mod.VARIANTS)} finished run(s)" in r.stdout
    assert len(list(csv.DictReader(open(csv_path)))) == len(rows)
    if script == "exp_bn_anatomy.py":   # its extra figure: accuracy against k, parts as bars
        r = _run([str(ROOT / "plot_results.py"), str(csv_path)], tmp_path)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "bn_anatomy_smoke_k_parts.png").stat().st_size > 10000


def test_interrupted_run_is_dropped_and_torn_line_repaired_on_disk(tmp_path):
    script = str(ROOT / "exp_table1_norms.py")
    r = _run([script, "--smoke", "--variants", "byol,random", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "table1_smoke.csv"
    lines = path.read_text().splitlines()
    byol_rows = [l for l in lines if l.startswith("table1,byol,")]
    # simulate a crash: byol's last epoch missing, and a torn half line at the end
    kept = [l for l in lines if l != byol_rows[-1]]
    path.write_text("\n".join(kept) + "\n" + byol_rows[-1][:12])
    r = _run([script, "--smoke", "--variants", "byol,random", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torn" in r.stderr and "reused 1 finished run(s)" in r.stdout and "[byol seed 0]" in r.stdout
    rows = list(csv.DictReader(open(path)))
    assert all(None not in row.values() for row in rows)
    assert sorted(int(r["epoch"]) for r in rows if r["variant"] == "byol") == [0, 1, 2]
    assert len([r for r in rows if r["variant"] == "random"]) == 1


def _rows(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(None not in r.values() and None not in r for r in rows), "a glued or short line"
    return rows


def test_only_identical_settings_are_reused(tmp_path):
    """A rerun reuses exactly the finished runs of the same full config; any changed setting
    trains; the summary shows only the requested runs; --fresh retrains and replaces."""
    base = [str(ROOT / "exp_table1_norms.py"), "--smoke", "--variants", "no_norm", "--epochs", "1",
            "--out", str(tmp_path)]
    path = tmp_path / "table1_smoke.csv"
    r = _run(base, tmp_path)
    assert r.returncode == 0, r.stderr
    first = _rows(path)
    r = _run(base, tmp_path)                                  # the same settings: reused
    assert r.returncode == 0 and "reused 1 finished run(s)" in r.stdout and "epoch   1" not in r.stdout
    assert _rows(path) == first
    assert "other settings" not in r.stdout
    r = _run(base + ["--set", "lr=0.05"], tmp_path)           # a changed setting: trains, says why
    assert r.returncode == 0 and "reused" not in r.stdout and "epoch   1" in r.stdout
    assert "1 earlier run(s) of these variants and seeds" in r.stdout
    rows = _rows(path)
    assert len(rows) == 2 * len(first) and len({row["cfg_hash"] for row in rows}) == 2
    new = [row for row in rows if row["cfg_hash"] != first[0]["cfg_hash"]]
    assert {row["cfg_lr"] for row in new} == {"0.05"}
    # the summary shows the requested run's last epoch, not the other config's
    summary = r.stdout.split("last epoch")[1]
    assert f"{float(new[-1]['probe_acc']):.4g}" in summary
    r = _run(base + ["--epochs", "2"], tmp_path)              # so does another epoch count
    assert r.returncode == 0 and "reused" not in r.stdout and "epoch   2" in r.stdout
    n = len(_rows(path))
    r = _run(base + ["--fresh"], tmp_path)                    # --fresh: retrains, replaces its rows
    assert r.returncode == 0 and "reused" not in r.stdout and "epoch   1" in r.stdout
    assert len(_rows(path)) == n


def test_csv_with_a_torn_tail_or_empty_is_repaired_before_appending(tmp_path):
    path = tmp_path / "table1_smoke.csv"
    args = [str(ROOT / "exp_table1_norms.py"), "--smoke", "--out", str(tmp_path)]
    path.write_text("")                                       # an empty file: gets its header
    r = _run(args + ["--variants", "random"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(_rows(path)) == 1
    with open(path, "a") as f:                                # a crash mid-append after it finished
        f.write("table1,random,1,0,,23.4")
    r = _run(args + ["--variants", "random", "--seeds", "0,1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torn" in r.stderr and "reused 1 finished run(s)" in r.stdout
    rows = _rows(path)
    assert [row["seed"] for row in rows] == ["0", "1"]
    assert path.read_text().endswith("\n")
    r = _run([str(ROOT / "plot_results.py"), str(path)], tmp_path)
    assert r.returncode == 0, r.stderr


def test_unwritable_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub", Path("/proc/x")):
        code, err = _main_in_process(["--smoke", "--out", str(out)], capsys)
        assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    # a read-only CSV (the tests may run as root, for whom chmod does not block writes: fake it)
    csv_path = tmp_path / "ro" / "table1_smoke.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("")
    real = os.access
    monkeypatch.setattr(common.os, "access", lambda p, mode: False if Path(p) == csv_path else real(p, mode))
    trained = []
    monkeypatch.setattr(common, "train_byol", lambda *a, **k: trained.append(1))
    code, err = _main_in_process(["--smoke", "--out", str(csv_path.parent)], capsys)
    assert code == 2 and "not a writable file" in err and not trained


def test_a_second_run_on_the_same_out_exits_2_and_loses_nothing(tmp_path):
    # 12 epochs (several seconds): the first run is still training when the second one starts
    args = [sys.executable, str(ROOT / "exp_table1_norms.py"), "--smoke", "--variants", "byol", "--epochs", "12",
            "--set", "eval_every=0", "--out", str(tmp_path)]
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:                                 # the first run holds the lock now
        if line.startswith("[byol seed 0]"):
            break
    second = _run(args[1:], tmp_path)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "another run" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    rows = _rows(tmp_path / "table1_smoke.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(13))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_unreadable_checkpoint_is_kept_aside_and_the_run_starts_afresh(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    cfg = dataclasses.replace(SMALL, epochs=1, eval_every=0)
    rows = common.train_byol(cfg, data=common.make_synthetic(64, 64), checkpoint=ckpt)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert "unreadable" in capsys.readouterr().err and (tmp_path / "run.pt.bad").exists()


def _main_in_process(argv, capsys):
    """exp_table1_norms.py's main with argv, in this process: (exit code, stderr)."""
    import exp_table1_norms as t1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.main("table1", t1.__doc__, t1.PRESETS, t1.VARIANTS, t1.BLOG, argv=argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--variants", "nope"], "unknown variant"),
    (["--epochs", "-1"], "epochs"),
    (["--set", "proj_norm=batch"], "proj_norm"),
    (["--set", "lr=fast"], "not a valid float"),
    (["--set", "compile=maybe"], "not a bool"),
    (["--seeds", "x"], "--seeds"),
    (["--seeds", "99999999999"], "--seeds"),
    (["--seeds", "0,0"], "twice"),
    (["--seeds", "1,99999999999"], "--seeds"),
    (["--batch-size", "100000"], "batch_size"),
    (["--batch-size", "1"], "batch_size must be >= 2"),
    (["--device", "meta"], "--device"),
    (["--device", "mps"], "--device"),
    (["--device", "cuda:7"], "--device"),
    (["--set", "encoder_norm=gn", "--set", "width=40"], "GroupNorm"),
    (["--set", "lr=nan"], "lr must be finite"),
    (["--set", "lr=inf"], "lr must be finite"),
    (["--set", "temperature=0"], "temperature"),
    (["--set", "momentum=-1"], "momentum"),
    (["--set", "weight_decay=-1e-4"], "weight_decay"),
    (["--set", "image_size=4"], "image_size must be 0"),
    (["--set", "image_size=64"], "larger than the synthetic images"),
    (["--set", "schedule_epochs=-1"], "schedule_epochs"),
])
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    code, err = _main_in_process(["--smoke", "--out", str(tmp_path), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_help_lists_config_fields_and_set_tells_the_truth(tmp_path, capsys, monkeypatch):
    r = _run([str(ROOT / "exp_lars.py"), "--help"], tmp_path)
    assert r.returncode == 0
    for field in dataclasses.fields(common.Config):
        assert f"  {field.name} = " in r.stdout, field.name
    assert "lars_form = \"blog\" [blog|byol]" in r.stdout
    # --set over a variant's own value: a warning, and the header prints the value used
    seen = []
    monkeypatch.setattr(common, "train_byol", lambda cfg, **k: seen.append(cfg) or [dict(epoch=0, loss=None)])
    import ablation_target_tau as tau
    capsys.readouterr()
    common.main("target_tau", tau.__doc__, tau.PRESETS, tau.VARIANTS,
                argv=["--smoke", "--variants", "tau_0", "--set", "base_tau=0.5", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "replaces variant tau_0's own base_tau=0.0" in err
    assert "[tau_0 seed 0] base_tau=0.5" in out and seen[0].base_tau == 0.5


def test_bad_input_exits_2_with_one_line_as_a_script(tmp_path):
    """The same from a shell, where a traceback would show."""
    r = _run([str(ROOT / "exp_table1_norms.py"), "--smoke", "--out", str(tmp_path), "--set", "lr=nan"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for args in (["--device", "bogus"], ["--steps", "0"]):
        r = _run([str(ROOT / "bench.py"), *args], tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    r = _run([str(ROOT / "plot_results.py"), str(tmp_path / "other.csv")], tmp_path)
    assert r.returncode == 2 and "not a results CSV" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_folder_exits_2(tmp_path):
    r = _run([str(ROOT / "exp_table1_norms.py"), "--preset", "cifar10", "--data-dir", str(tmp_path / "none"),
              "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_data_folder_is_reported_as_such(tmp_path, monkeypatch):
    folder = tmp_path / common.CIFAR_DIR
    folder.mkdir()
    # the tests may run as root, for whom chmod 000 does not block reads: fake the permission
    monkeypatch.setattr(common.os, "access", lambda path, mode: Path(path) != folder)
    with pytest.raises(common.UsageError, match="permission denied"):
        common.load_dataset("cifar10", str(tmp_path))


def test_diverged_run_stops_and_is_recorded(tmp_path):
    r = _run([str(ROOT / "exp_table1_norms.py"), "--smoke", "--variants", "no_norm", "--set", "lr=1e12",
              "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "diverged" in r.stderr
    rows = list(csv.DictReader(open(tmp_path / "table1_smoke.csv")))
    assert rows[-1]["loss"] in ("nan", "inf") and int(rows[-1]["epoch"]) < 2


def test_plot_results_draws_every_csv(tmp_path):
    r = _run([str(ROOT / "exp_lars.py"), "--smoke", "--variants", "bn_sgd_mlp_bn,gn_lars_layer12",
              "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run([str(ROOT / "plot_results.py"), str(tmp_path / "lars_smoke.csv")], tmp_path)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "lars_smoke.png"
    assert png.stat().st_size > 10000 and png.read_bytes()[:4] == b"\x89PNG"
    r = _run([str(ROOT / "plot_results.py"), "--table", str(tmp_path / "lars_smoke.csv")], tmp_path)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith("| variant | epoch | seeds | probe_acc")
    assert [l.split(" | ")[0] for l in lines[2:]] == ["| bn_sgd_mlp_bn", "| gn_lars_layer12"]


def test_results_table_is_mean_and_sample_std_and_keeps_small_values(tmp_path):
    import plot_results
    path = tmp_path / "t.csv"
    cols = ["exp", "variant", "seed", "epoch", "loss", "probe_acc", "pos_cos", "neg_cos", "z_std"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerow(["x", "wd", 0, 8, 1e-7, 20.0, 0.99999, 0.99999, 5e-5])
        w.writerow(["x", "wd", 1, 7, 1e-7, 99.0, 0.5, 0.5, 1.0])     # not the last epoch: left out
        w.writerow(["x", "wd", 1, 8, 1e-7, 22.0, 0.99999, 0.99999, 4e-5])
    row = plot_results.table(path).splitlines()[2]
    # probe 21.0 ± sqrt(2); z_std 4.5e-5 ± 7.07e-6 must not print as 0.0000 ± 0.0000
    assert row == "| wd | 8 | 2 | 21.0 ± 1.4 | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 | 4.5e-05 ± 7.1e-06 |"


def test_merge_results_combines_shards_and_refuses_conflicts(tmp_path):
    script = str(ROOT / "exp_table1_norms.py")
    for shard in ("a", "b"):
        r = _run([script, "--smoke", "--variants", "random", "--seeds", "1" if shard == "a" else "1,2",
                  "--out", str(tmp_path / shard)], tmp_path)
        assert r.returncode == 0, r.stderr
    a, b = tmp_path / "a" / "table1_smoke.csv", tmp_path / "b" / "table1_smoke.csv"
    r = _run([str(ROOT / "merge_results.py"), str(a), str(b), str(a), "--out", str(tmp_path / "all.csv")], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "all.csv")))
    assert sorted(r["seed"] for r in rows) == ["0", "1", "2"]
    torn = tmp_path / "torn.csv"                       # a crash mid-write: the torn line is left out
    torn.write_text(b.read_text() + "table1,random,9,0,,2")
    r = _run([str(ROOT / "merge_results.py"), str(a), str(torn), "--out", str(tmp_path / "t.csv")], tmp_path)
    assert r.returncode == 0 and "torn" in r.stderr
    assert sorted(r["seed"] for r in _rows(tmp_path / "t.csv")) == ["0", "1", "2"]
    bad = tmp_path / "bad.csv"
    lines = a.read_text().splitlines()
    cells = lines[1].split(",")
    cells[5] = "99.9"                                   # probe_acc of the same key, different
    bad.write_text("\n".join([lines[0], ",".join(cells)]) + "\n")
    r = _run([str(ROOT / "merge_results.py"), str(a), str(bad), "--out", str(tmp_path / "x.csv")], tmp_path)
    assert r.returncode == 2 and "disagrees" in r.stderr and not (tmp_path / "x.csv").exists()


def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    import signal
    args = [sys.executable, str(ROOT / "exp_table1_norms.py"), "--smoke", "--variants", "contrastive",
            "--epochs", "3"]
    ref = _run(args[1:] + ["--out", str(tmp_path / "ref")], tmp_path)
    assert ref.returncode == 0, ref.stderr
    p = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.strip().startswith("epoch   1"):
            p.send_signal(signal.SIGKILL)          # a crash right after epoch 1 was checkpointed
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert list((tmp_path / "cut" / "checkpoints").glob("*.pt"))
    r = _run(args[1:] + ["--out", str(tmp_path / "cut")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from the checkpoint after epoch" in r.stdout
    assert not list((tmp_path / "cut" / "checkpoints").glob("*.pt"))   # cleaned up when done

    def rows(d):
        return [{k: v for k, v in row.items() if k != "wall_s"}
                for row in csv.DictReader(open(tmp_path / d / "table1_smoke.csv"))]
    assert rows("cut") == rows("ref") and len(rows("ref")) == 4


def test_lars_lr_logging_covers_only_adapted_weights():
    torch.manual_seed(0)
    model = common.BYOL(SMALL)
    for which, expected in (("layer12", {"encoder.layer1", "encoder.layer2"}),
                            ("mlp", {"projector.0", "projector.3", "predictor.0", "predictor.3"})):
        opt = common.LARS(common.param_groups(model, dataclasses.replace(SMALL, optimizer="lars", lars_params=which)),
                          lr=0.5, eta=1e-3)
        model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))["loss"].backward()
        opt.step()
        logged = common.lars_lrs(opt)
        assert set(logged) == {f"lars_lr:{k}" for k in expected}
        assert all(v > 0 for v in logged.values())
        model.zero_grad()


def test_bf16_autocast_runs_only_the_encoders_in_bf16():
    model = common.BYOL(SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
        y = model.online_encoder(torch.randn(8, 3, 32, 32))
        z, p = model.online(torch.randn(8, 3, 32, 32))
        t = model.target(torch.randn(8, 3, 32, 32))
    assert y.dtype == torch.bfloat16                      # the encoders do run in bf16
    assert z.dtype == p.dtype == t.dtype == torch.float32   # projector and predictor do not
    assert all(out[k].dtype == torch.float32 for k in ("loss", "pos_cos", "neg_cos", "z_std"))
    cpu = torch.device("cpu")
    assert not common.use_bf16(SMALL, cpu) and common.use_bf16(dataclasses.replace(SMALL, precision="bf16"), cpu)
    with pytest.raises(common.UsageError):
        common.check_config(dataclasses.replace(SMALL, precision="fp16"))


# ------------------------------------------------------------- several processes (torchrun)

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_two_processes_with_sync_bn_match_one_process(tmp_path):
    """torchrun with gloo: 2 CPU processes x 32 images = the 1-process batch of 64. Two steps
    (one epoch of 128 images). With --sync-bn the epoch's loss equals the single process's to
    float noise (measured 6e-6 relative; convolutions sum in a batch-size-dependent
    order and BYOL's gradient at init amplifies that, so weights are not bitwise equal); with
    per-process BN (statistics over 32) it differs (measured 6e-4). Only rank 0 writes."""
    args = [str(ROOT / "exp_table1_norms.py"), "--smoke", "--variants", "byol", "--set", "train_subset=128",
            "--set", "epochs=1"]
    loss = {}
    for name, launch, flags in (("one", [], []), ("sync_bn", TORCHRUN, ["--sync-bn"]), ("per_rank_bn", TORCHRUN, [])):
        r = _run([*launch, *args, *flags, "--out", str(tmp_path / name)], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = list(csv.DictReader(open(tmp_path / name / "table1_smoke.csv")))
        assert [row["epoch"] for row in rows] == ["0", "1"]   # one writer
        loss[name] = float(rows[-1]["loss"])
    assert abs(loss["sync_bn"] - loss["one"]) < 1e-4 * loss["one"]
    assert abs(loss["per_rank_bn"] - loss["one"]) > 3e-4 * loss["one"]


GLOBAL_BN_SCRIPT = """
import sys, torch, common
rank, n = common.init_distributed("cpu")
g = torch.Generator().manual_seed(0)
x = (torch.randn(8, 4, 5, 5, generator=g) * 0.01 + 100).contiguous(memory_format=torch.channels_last)
w = torch.randn(8, 4, 5, 5, generator=g)
bn = common.convert_sync_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), torch.device("cpu"))[0]
assert isinstance(bn, common.GlobalBatchNorm)
xi = x[4 * rank:4 * rank + 4].clone().requires_grad_(True)
y = bn(xi)
(y * w[4 * rank:4 * rank + 4]).sum().backward()
torch.save(dict(y=y.detach(), gx=xi.grad, gw=bn.weight.grad, mean=bn.running_mean, var=bn.running_var),
           sys.argv[1] + f"/rank{rank}.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()   # else gloo's threads can abort the exit
"""


def test_global_batchnorm_over_two_processes_is_batchnorm_over_the_whole_batch(tmp_path):
    """GlobalBatchNorm (--sync-bn off CUDA) on 2 ranks x 4 = nn.BatchNorm2d on 8: outputs,
    input gradients, summed weight gradients, running stats; a large mean over a tiny spread
    (a collapsed batch) stays exact to float32 (two-pass statistics; one-pass E[x^2] - E[x]^2
    would lose the variance entirely)."""
    (tmp_path / "gbn.py").write_text(GLOBAL_BN_SCRIPT)
    r = subprocess.run([sys.executable, *TORCHRUN, str(tmp_path / "gbn.py"), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 4, 5, 5, generator=g) * 0.01 + 100).requires_grad_(True)
    w = torch.randn(8, 4, 5, 5, generator=g)
    bn = nn.BatchNorm2d(4)
    y = bn(x)
    (y * w).sum().backward()
    assert torch.allclose(torch.cat([d["y"] for d in ranks]), y, atol=1e-3)
    assert torch.allclose(torch.cat([d["gx"] for d in ranks]), x.grad, rtol=1e-3, atol=1e-2)
    assert torch.allclose(ranks[0]["gw"] + ranks[1]["gw"], bn.weight.grad, rtol=1e-2, atol=1e-2)
    for d in ranks:
        assert torch.allclose(d["mean"], bn.running_mean, atol=1e-4)
        assert torch.allclose(d["var"], bn.running_var, rtol=1e-3, atol=1e-8)


# ---------------------------------------------------------------- exp_escape_law: reading an escape
def _loss_rows(losses, neg=0.9999):
    return [dict(epoch=str(e), loss=str(x), neg_cos=str(neg)) for e, x in enumerate(losses, start=1)]


def test_escape_reads_turn_and_rise_from_the_loss():
    import exp_escape_law as law
    # falls to 1e-6 at epoch 4, a 2x wobble (not an escape), then 5x its lowest at epoch 7
    assert law.escape(_loss_rows([1e-2, 1e-4, 1e-5, 1e-6, 2e-6, 1.5e-6, 5e-6])) == (4, 7)
    assert law.escape(_loss_rows([1e-2, 1e-3, 1e-4, 1e-5])) == (None, None)   # still falling: censored
    # never collapsed (negative cosine below 0.999): no escape, whatever the loss does
    assert law.escape(_loss_rows([1e-2, 1e-4, 1e-3], neg=0.5)) == (None, None)
    # counting starts at the first collapsed epoch: the fall before it is not a lowest value
    rows = _loss_rows([1e-6, 1e-2, 1e-3, 5e-3])
    rows[0]["neg_cos"] = "0.5"
    assert law.escape(rows) == (3, 4)


def test_escape_fit_recovers_a_known_power_law():
    import exp_escape_law as law
    rows = [dict(lr_wd=p, rise_step=round(0.08 / p ** 0.7), turn_step=None) for p in (2e-4, 1e-4, 5e-5, 2.5e-5)]
    slope, se, n = law.fit(rows, "rise")
    assert n == 4 and abs(slope + 0.7) < 0.01 and se < 0.01
    assert law.fit(rows, "turn") == (None, None, 0)


def test_escape_law_variants_keep_lr_times_wd_and_reach_the_clock():
    import exp_escape_law as law
    for name, v in law.VARIANTS.items():
        assert any(math.isclose(v["lr"] * v["weight_decay"], p, rel_tol=1e-3) for p in law.PRODUCTS), name
        assert law.epochs_for(v) * 78 * v["lr"] * v["weight_decay"] >= law.CLOCK
    assert len(law.VARIANTS) == len(law.PRODUCTS) * len(law.LRS)


def test_escape_law_analyze_refuses_a_foreign_csv_in_one_line(tmp_path):
    for target in (tmp_path / "missing.csv", ROOT / "results" / "lars_cpu.csv"):
        r = _run([str(ROOT / "exp_escape_law.py"), "--analyze", str(target)], tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr


def test_recovery_table_reads_collapse_recovery_and_the_decay_clock(tmp_path):
    import plot_results
    path = tmp_path / "x_steps.csv"
    neg = [None, 0.5, 0.9995, 0.9999, 0.95, 0.6]   # collapses at epoch 2, recovers (<= 0.9) at 5
    probe = [20.0, None, 15.0, None, 18.0, 30.0]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*plot_results.NEEDED, "lr", "cfg_weight_decay"])
        w.writeheader()
        for e in range(6):
            w.writerow(dict(variant="v", seed=0, epoch=e, loss=1e-3 if e else "", probe_acc=probe[e] or "",
                            pos_cos=neg[e] or "", neg_cos=neg[e] or "", lr=0.5 if e else "", cfg_weight_decay=1e-3))
    cells = plot_results.recovery(path, 10).splitlines()[2].split(" | ")
    # 5 epochs x 10 steps at lr 0.5, wd 1e-3: 0.025
    assert cells[2:8] == ["5", "50", "0.025", "2", "0.6000 (ep 5)", "5"]
    assert cells[8].rstrip(" |") == "20.0 / 30.0 / 30.0"
    r = _run([str(ROOT / "plot_results.py"), "--recovery", str(path)], tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
