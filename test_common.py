"""Tests of the research code, common.py, and the library under it (augment.py, logreg.py,
runtime.py): networks, loss, EMA, LARS, augmentations, probe, data loaders, config checks, build,
the training step and BYOL's stages, the loop, and the ablations built on the stages
(ablation_*.py, contrastive.py, exp_mechanism.py, exp_bn_anatomy.py). CPU only (conftest.py hides GPUs), no downloads:
python -m pytest -q -n 2 test_common.py test_harness.py test_plot_results.py"""
import ast
import dataclasses
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF

import augment
import common
import conftest
import contrastive
import exp_bn_anatomy
import harness
import instruments
import presets
import runtime

ROOT = Path(__file__).resolve().parent
SMALL = common.Config(dataset="synthetic", width=4, mlp_hidden_dim=32, proj_dim=16, batch_size=64,
                      epochs=2, queue_size=256, device="cpu", lr=0.2)


def _views(n=16, size=32, seed=0):
    """Two batches of random images, views v and v' as BYOL.forward takes them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)]


def check(cfg, data=None):
    return runtime.check_config(cfg, common.MLP_NORMS, data)


# ------------------------------------------------------------------------------ models

@pytest.mark.parametrize("norm", common.MLP_NORMS)
def test_mlp_shapes_and_norm_after_first_linear_only(norm):
    mlp = common.build_mlp(64, 128, 16, norm)
    assert mlp(torch.randn(64, 64)).shape == (64, 16)
    kinds = [type(m) for m in mlp]
    assert kinds[0] is (common.WSLinear if norm == "gn_ws" else nn.Linear)
    assert kinds[-1] is nn.Linear and kinds[2] is nn.ReLU
    parts = exp_bn_anatomy.BatchNormParts   # the norms exp_bn_anatomy.py registers by name
    expected = {"none": nn.Identity, "bn": nn.BatchNorm1d, "ln": nn.LayerNorm, "gn": nn.GroupNorm,
                "gn_ws": nn.GroupNorm, **dict.fromkeys(exp_bn_anatomy.NORMS, parts)}[norm]
    assert kinds[1] is expected
    n_norms = sum(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, parts)) for m in mlp)
    assert n_norms == (0 if norm == "none" else 1)
    if norm.startswith("bn_ghost"):   # ghost BN: statistics over groups of k samples, affine kept
        assert mlp[1].group == int(norm[len("bn_ghost"):]) and mlp[1].weight is not None


def test_the_lars_logged_names_are_the_models_weights():
    """The weights the LARS logging reads (LARS_LOGGED) are named as BYOL names them: the stem conv,
    the first conv of each stage, and the two Linear layers of the projector and the predictor
    (projector.0, projector.3: the norm and ReLU between them keep those indices)."""
    params = dict(common.BYOL(SMALL).named_parameters())
    assert set(common.LARS_LOGGED) <= set(params)
    assert all(params[n].ndim in (2, 4) for n in common.LARS_LOGGED)
    assert {n for n in common.LARS_LOGGED if params[n].ndim == 2} == {
        f"{m}.{i}.weight" for m in ("online_projector", "predictor") for i in (0, 3)}


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
    model(_views(8))["loss"].backward()
    assert model.online_projector[0].weight.grad.abs().sum() > 0


def test_a_subclass_supplies_its_own_parameter_groups_and_model():
    """LR_MULT: the predictor's lr is 10x the schedule's at every step, and logged; a subclass
    changes the model (here: a frozen predictor), and its param_groups() sees the change."""
    data = runtime.make_synthetic(128, 64)
    cfg = dataclasses.replace(SMALL, epochs=2, eval_every=0, lr=0.2, schedule_epochs=4)

    class Fast(common.BYOL):
        LR_MULT = {"predictor.": 10.0}
    rows = common.train_byol(cfg, data=data, model_fn=Fast)
    for r in rows[1:]:
        assert r["lr:predictor"] == pytest.approx(10 * r["lr"]) and r["lr"] < 0.2   # follows the cosine
    groups = Fast(cfg).param_groups()
    assert {g.get("label") for g in groups} == {None, "predictor"}
    assert all(n.startswith("predictor.") == (g.get("lr_mult") == 10.0) for g in groups for n in g["names"])
    seen = []

    class FrozenPredictor(common.BYOL):
        def __init__(self, cfg, image_size=32):
            super().__init__(cfg, image_size)
            self.predictor.requires_grad_(False)

        def param_groups(self):
            seen.append(self)
            return super().param_groups()
    common.train_byol(dataclasses.replace(cfg, epochs=1), data=data, model_fn=FrozenPredictor)
    runtime.set_seed(cfg.seed)                               # train_byol's seed: the same init
    init = FrozenPredictor(cfg, 32)
    assert all(torch.equal(p, q) for p, q in zip(seen[0].predictor.parameters(), init.predictor.parameters()))
    assert not torch.equal(seen[0].online_projector[0].weight, init.online_projector[0].weight)   # it trained


def test_batchnorm_parts_with_the_whole_batch_is_batchnorm():
    parts = exp_bn_anatomy.BatchNormParts
    x = torch.randn(16, 6) * 3 + 1
    mods = nn.BatchNorm1d(6), parts(6, group=0), parts(6, group=16)
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
    parts = exp_bn_anatomy.BatchNormParts
    x = torch.randn(32, 5) * 2 + 3
    k = 8
    ghost = parts(5, group=k, affine=False)(x)
    per_group = torch.cat([parts(5, affine=False)(c) for c in x.split(k)])
    assert torch.allclose(ghost, per_group, atol=1e-6)
    assert not torch.allclose(ghost, parts(5, affine=False)(x), atol=1e-2)
    groups = x.view(-1, k, 5)
    center = parts(5, group=k, scale=False, affine=False)(x).view(-1, k, 5)
    assert torch.allclose(center.mean(1), torch.zeros(4, 5), atol=1e-5)   # zero mean per group
    assert torch.allclose(center, groups - groups.mean(1, keepdim=True), atol=1e-6)   # nothing else
    scale = parts(5, group=k, center=False, affine=False)(x).view(-1, k, 5)
    std = groups.var(1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    assert torch.allclose(scale, groups / std, atol=1e-5)   # divided by the std, mean kept
    assert scale.mean(1).abs().mean() > 1.0   # x has mean 3, std 2: the mean survives as ~1.5
    with pytest.raises(runtime.UsageError, match="multiple"):
        parts(5, group=3)(x)


def test_mlp_unknown_norm_raises():
    """An MLP norm must be a name in MLP_NORMS: check_config refuses another in one line naming the
    choices (build_mlp itself only looks the name up)."""
    for field in ("proj_norm", "pred_norm"):
        with pytest.raises(runtime.UsageError, match=f"{field}='batchnorm' is not one of none, bn, ln") as e:
            check(dataclasses.replace(SMALL, **{field: "batchnorm"}))
        assert "\n" not in str(e.value)
    with pytest.raises(KeyError):
        common.build_mlp(4, 8, 4, "batchnorm")


@pytest.mark.parametrize("stem,size,out_hw", [("cifar", 32, 32), ("imagenet", 96, 24)])
@pytest.mark.parametrize("norm", ["bn", "gn", "gn_ws", "none"])
def test_resnet_shapes_and_norms(stem, size, out_hw, norm):
    net = common.ResNet(width=8, stem=stem, norm=norm)
    assert net(torch.randn(2, 3, size, size)).shape == (2, 64)
    # stage-1 resolution: stride-1 CIFAR stem vs 7x7/2 conv + maxpool ImageNet stem
    assert net.layer1(net.maxpool(net.conv1(torch.randn(1, 3, size, size)))).shape[-1] == out_hw
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    has_gn = any(isinstance(m, nn.GroupNorm) for m in net.modules())
    has_ws = any(isinstance(m, common.WSConv2d) for m in net.modules())
    assert (has_bn, has_gn, has_ws) == (norm == "bn", norm in ("gn", "gn_ws"), norm == "gn_ws")
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 20   # 17 + 3 shortcuts


def test_resnet_depth_34_has_the_papers_stages_at_any_width():
    """depth=34: [3, 4, 6, 3] BasicBlocks (18: [2, 2, 2, 2]) at the asked width; BYOL builds it
    from the Config field, and an unknown depth is a usage error."""
    for depth, blocks in ((18, [2, 2, 2, 2]), (34, [3, 4, 6, 3])):
        net = common.ResNet(width=4, stem="cifar", norm="bn", depth=depth)
        assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == blocks
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 32) and net.out_dim == 32
        assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 1 + 2 * sum(blocks) + 3   # + 3 shortcuts
    model = common.BYOL(dataclasses.replace(SMALL, depth=34))
    assert len(model.online_encoder.layer3) == 6 and len(model.target_encoder.layer3) == 6
    with pytest.raises(runtime.UsageError, match="depth must be one of 18, 34"):
        check(dataclasses.replace(SMALL, depth=50))
    assert runtime.DEPTHS == tuple(common.RESNET_STAGES)


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
    v1, v2 = _views()
    for a, b in zip(model.online_encoder.parameters(), model.target_encoder.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    out = model([v1, v2])
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


def _step(model, v1, v2):
    """One forward and backward: the outputs and every online gradient."""
    model.zero_grad()
    out = model([v1, v2])
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_simsiam_skips_the_target_with_the_same_numbers():
    """base_tau 0 (constant): the target is the online network under a stop-gradient, so forward
    uses the online projections, detached, and runs no target forward. The loss, every gradient,
    every statistic and a whole run's rows are those of running the target (the flag off)."""
    cfg = dataclasses.replace(SMALL, base_tau=0.0, epochs=1, eval_every=0)
    assert common.BYOL(cfg).target_is_online and not common.BYOL(SMALL).target_is_online
    assert not common.BYOL(dataclasses.replace(cfg, tau_schedule="cosine")).target_is_online   # tau rises to 1
    v1, v2 = _views()
    runtime.set_seed(0)
    skip = common.BYOL(cfg)
    runtime.set_seed(0)
    full = common.BYOL(cfg)
    full.target_is_online = False
    calls = []
    skip.target_encoder.register_forward_hook(lambda *a: calls.append(1))
    (out_s, g_s), (out_f, g_f) = _step(skip, v1, v2), _step(full, v1, v2)
    assert calls == []   # the skip path never ran the target
    assert g_s.keys() == g_f.keys() and all(torch.equal(g_s[n], g_f[n]) for n in g_s)
    for k in ("loss", "z", *common.STATS[1:]):
        assert torch.equal(out_s[k], out_f[k]), k
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(out_s["targets"], out_f["targets"]))

    def full_target(cfg, image_size):
        model = common.BYOL(cfg, image_size)
        model.target_is_online = False
        return model
    data = runtime.make_synthetic(256, 128)
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in common.train_byol(cfg, data=data)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"}
                     for r in common.train_byol(cfg, data=data, model_fn=full_target)]

    class OwnTarget(common.BYOL):   # a subclass with its own target keeps running it
        def target(self, v):
            return super().target(v)
    assert not OwnTarget(cfg).target_is_online


def test_loss_encoder_and_ema_twins_are_extension_points():
    """A subclass overrides BYOL.loss (forward calls it with the normalized predictions and
    target projections), build_encoder, and EMA_PAIRS: a target predictor is made as a copy without
    gradient, left out of the optimizer's groups, and moved by train_step with rate tau."""
    class OneSided(common.BYOL):
        def loss(self, ps, ts, zs):
            return 2 * (1 - (ps[0] * ts[1]).sum(1)).mean()
    torch.manual_seed(0)
    model = OneSided(SMALL)
    v1, v2 = _views()
    out = model([v1, v2])
    with torch.no_grad():
        _, p1 = model.online(v1)
        hand = 2 * (1 - nn.functional.cosine_similarity(p1, model.target(v2))).mean()
    assert torch.allclose(out["loss"], hand, atol=1e-6)

    class Small(common.BYOL):
        def build_encoder(self, cfg, image_size):
            net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            net.out_dim = 8
            return net
    small = Small(SMALL)
    assert small.online_projector[0].in_features == 8 and small.target_encoder[0].weight.shape == (8, 3, 3, 3)

    class TargetPredictor(common.BYOL):
        EMA_PAIRS = common.BYOL.EMA_PAIRS + (("target_predictor", "predictor"),)
    s = common.build(dataclasses.replace(SMALL, lr=0.1), torch.device("cpu"), model_fn=TargetPredictor)
    model = s.model
    assert all(torch.equal(a, b) and not b.requires_grad
               for a, b in zip(model.predictor.parameters(), model.target_predictor.parameters()))
    groups = model.param_groups()
    assert not any(n.startswith("target_") for g in groups for n in g["names"])
    in_opt = {id(p) for g in s.opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for n, p in model.named_parameters() if n.startswith("target_"))
    before = [p.clone() for p in model.target_predictor.parameters()]
    common.train_step(s, [v1, v2], 0.75, 0)
    for b, t, o in zip(before, model.target_predictor.parameters(), model.predictor.parameters()):
        assert not torch.equal(t, b) and torch.allclose(t, 0.75 * b + 0.25 * o, atol=1e-6)


# ------------------------------------------------- build, train_step and BYOL's extension points

CPU = torch.device("cpu")


def _train_steps(cfg, model_fn, n, each=None):
    """build(cfg) and n train_steps (step = 0 .. n-1, tau = cfg.base_tau) on the model's views of
    one batch of synthetic images, as train_byol makes them; each(step, setup, before) after every
    step, where before holds the model's parameters and buffers from before the step."""
    s = common.build(cfg, CPU, model_fn)
    images = runtime.make_synthetic(cfg.batch_size, 8)["pretrain_x"]
    gen = torch.Generator().manual_seed(0)
    for step in range(n):
        before = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
        common.train_step(s, s.model.views(images, gen), cfg.base_tau, step)
        if each:
            each(step, s, before)
    return s


def _pairs(model, buffers=False):
    """(name, target tensor, online tensor) of every EMA_PAIRS pair, parameters (and buffers)."""
    out = []
    for target, online in model.EMA_PAIRS:
        t, o = getattr(model, target), getattr(model, online)
        kinds = ("named_parameters", "named_buffers") if buffers else ("named_parameters",)
        for kind in kinds:
            for (n, a), (_, b) in zip(getattr(t, kind)(), getattr(o, kind)()):
                out.append((f"{target}.{n}", a, b))
    return out


def test_build_gives_the_same_initial_weights_for_the_same_config():
    """build seeds before it makes the model: two builds of one cfg give the same weights whatever
    ran in between, another seed gives others, and train_byol trains exactly build's model. In one
    process without --compile the step runs the model itself and the eager augmentation."""
    a = common.build(SMALL, CPU)
    torch.randn(1000)   # the global random stream moved: build must not depend on it
    b = common.build(SMALL, CPU)
    other = common.build(dataclasses.replace(SMALL, seed=1), CPU)
    sa, sb, so = (x.model.state_dict() for x in (a, b, other))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], so[k]) for k in sa if sa[k].is_floating_point())
    assert [g["names"] for g in a.opt.param_groups] == [g["names"] for g in b.opt.param_groups]
    assert [id(p) for g in a.opt.param_groups for p in g["params"]] == [
        id(p) for p in a.model.parameters() if p.requires_grad]
    assert a.step_fn is a.model and not a.amp and a.model.cfg is SMALL
    seen = []

    class Seen(common.BYOL):
        def configure_optimizer(self):
            seen.append({k: v.clone() for k, v in self.state_dict().items()})
            return super().configure_optimizer()
    common.train_byol(dataclasses.replace(SMALL, epochs=0), data=runtime.make_synthetic(64, 32), model_fn=Seen)
    assert len(seen) == 1 and all(torch.equal(seen[0][k], sa[k]) for k in sa)


def test_train_byol_calls_the_stages_once_each_in_order():
    """train_byol calls nothing of the model but its stages, in the order of BYOL's docstring:
    start once (a fresh run), evaluate after every epoch (epoch 0 too, without views), and per
    step set_lr, views, before_step, forward, update_target(tau, step), after_step(step, out), with
    step = 0, 1, 2, ... running on across epochs. out is that step's forward outputs; the target
    after_step sees has already taken this step's EMA of the online weights; evaluate gets the
    epoch's last views and outputs, and its dict lands in the row."""
    calls, seen, init, last = [], [], [], []

    class Recorder(common.BYOL):
        def __init__(self, cfg, image_size=32):
            super().__init__(cfg, image_size)
            init.append([p.detach().clone() for p in self.target_projector.parameters()])

        def start(self, images, gen):
            calls.append(("start", len(images)))

        def set_lr(self, opt, step, total_steps):
            calls.append(("set_lr", step, total_steps))
            return super().set_lr(opt, step, total_steps)

        def views(self, x, gen):
            calls.append(("views", len(x)))
            return super().views(x, gen)

        def before_step(self, step):
            calls.append(("before_step", step))

        def forward(self, views):
            calls.append(("forward", len(views)))
            return super().forward(views)

        def update_target(self, tau, step):
            calls.append(("update_target", step, tau))
            super().update_target(tau, step)

        def after_step(self, step, out):
            calls.append(("after_step", step))
            seen.append((out["loss"].item(), [p.detach().clone() for p in self.target_projector.parameters()],
                         [p.detach().clone() for p in self.online_projector.parameters()]))

        def evaluate(self, data, epoch, views=None, out=None):
            calls.append(("evaluate", epoch, views is None, out is None))
            last.append((views, out))
            return dict(super().evaluate(data, epoch, views, out), mine=epoch)
    cfg = dataclasses.replace(SMALL, epochs=2, eval_every=0, base_tau=0.5)
    rows = common.train_byol(cfg, data=runtime.make_synthetic(128, 64), model_fn=Recorder)   # 2 steps an epoch
    step_calls = [[("set_lr", k, 4), ("views", 64), ("before_step", k), ("forward", 2), ("update_target", k, 0.5),
                   ("after_step", k)] for k in range(4)]
    assert calls == [("start", 128), ("evaluate", 0, True, True), *step_calls[0], *step_calls[1],
                     ("evaluate", 1, False, False), *step_calls[2], *step_calls[3], ("evaluate", 2, False, False)]
    assert [r["mine"] for r in rows] == [0, 1, 2] and rows[1]["probe_acc"] is None and rows[2]["probe_acc"] > 0
    assert last[2][1]["loss"].item() == seen[3][0]   # evaluate sees the epoch's last step
    for epoch in (1, 2):   # out is the step's own: the epoch's mean loss is the mean of the hooks'
        assert rows[epoch]["loss"] == pytest.approx((seen[2 * epoch - 2][0] + seen[2 * epoch - 1][0]) / 2, rel=1e-6)
    prev = init[0]
    for _, target, online in seen:   # tau 0.5: target_k = (target_{k-1} + online_k) / 2, already applied
        assert all(torch.allclose(t, 0.5 * p + 0.5 * o, atol=1e-6) for t, p, o in zip(target, prev, online))
        assert not all(torch.equal(t, p) for t, p in zip(target, prev))
        prev = target


def test_an_overridden_update_target_replaces_the_ema():
    """update_target is the target's whole update: overridden with a no-op, the target stays its
    initial copy of the online network (which trains on); the default EMA moves it."""
    class Frozen(common.BYOL):
        def update_target(self, tau, step):
            pass
    cfg = dataclasses.replace(SMALL, base_tau=0.5)
    init = common.build(cfg, CPU).model
    for model_fn, moves in ((Frozen, False), (None, True)):
        model = _train_steps(cfg, model_fn, 3).model
        for name, target, online in _pairs(model):
            start = init.get_parameter(name)
            assert torch.equal(target, start) != moves, name
            if online.ndim > 1:   # every online weight trained
                assert not torch.equal(online, start), name


def test_loss_receives_the_raw_online_projections_with_gradient():
    """loss(ps, ts, zs): zs are the online projections of v and v', raw (not normalized) and with
    their gradient, so a term on them trains the projector and the encoder."""
    seen = {}

    class OnProjections(common.BYOL):
        def loss(self, ps, ts, zs):
            seen.update(z1=zs[0], z2=zs[1])
            return zs[0].pow(2).sum(1).mean() + zs[1].pow(2).sum(1).mean()   # a term on z alone
    torch.manual_seed(0)
    model = OnProjections(SMALL)
    v1, v2 = _views()
    out = model([v1, v2])
    out["loss"].backward()
    with torch.no_grad():
        z1, z2 = model.online(v1)[0], model.online(v2)[0]
    assert seen["z1"].requires_grad and seen["z2"].requires_grad
    assert torch.allclose(seen["z1"].detach(), z1, atol=1e-6) and torch.allclose(seen["z2"].detach(), z2, atol=1e-6)
    assert not torch.allclose(z1.norm(dim=1), torch.ones(16), atol=1e-2)   # not normalized
    assert torch.equal(out["z"], seen["z1"].detach())
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.online_projector.parameters() if p.ndim > 1)
    assert model.online_encoder.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.predictor.parameters())   # p1, p2 unused: no gradient


def test_build_encoder_is_told_the_image_size():
    """build_encoder(cfg, image_size) gets the size of the images it will train on: after
    image_size resizes them, or as the data stores them; a bare BYOL(cfg) says 32."""
    sizes = []

    class Sized(common.BYOL):
        def build_encoder(self, cfg, image_size):
            sizes.append(image_size)
            return super().build_encoder(cfg, image_size)
    rows = common.train_byol(dataclasses.replace(SMALL, image_size=16, epochs=1, eval_every=0),
                             data=runtime.make_synthetic(64, 32), model_fn=Sized)
    assert sizes == [16] and math.isfinite(rows[-1]["loss"])
    common.train_byol(dataclasses.replace(SMALL, epochs=0), data=runtime.make_synthetic(64, 32, size=24),
                      model_fn=Sized)
    Sized(SMALL)
    assert sizes == [16, 24, 32]


def test_check_config_refuses_what_the_data_cannot_give():
    """With the data, check_config also refuses a batch larger than the training images (after
    train_subset) and an image_size above the images' (it only downsamples), each in one line;
    train_byol checks before it builds anything."""
    data = runtime.make_synthetic(64, 16)
    for ok in (dict(), dict(image_size=16), dict(image_size=32), dict(epochs=0, batch_size=128)):
        check(dataclasses.replace(SMALL, **ok), data)
    check(dataclasses.replace(SMALL, batch_size=128, image_size=48))   # no data: nothing to check
    for bad, message in ((dict(batch_size=128), "batch_size 128 > 64 training images"),
                         (dict(train_subset=32), "batch_size 64 > 32 training images"),
                         (dict(image_size=48), "image_size=48 is larger than the synthetic images (32 px)")):
        with pytest.raises(runtime.UsageError) as e:
            check(dataclasses.replace(SMALL, **bad), data)
        assert message in str(e.value) and "\n" not in str(e.value)
    built = []
    with pytest.raises(runtime.UsageError, match="image_size=48"):
        common.train_byol(dataclasses.replace(SMALL, image_size=48), data=data,
                          model_fn=lambda cfg, size: built.append(size))
    assert built == []


# ------------------------------------------- the two hook examples (ablation_directpred.py, ablation_hard_target.py)

def test_directpred_example_sets_its_predictor_in_closed_form_every_k_steps():
    """DirectPredBYOL: the predictor takes no gradient and is not in the optimizer; after_step
    sets it to DirectPred's closed form of the correlation buffer at steps 0, K, 2K, ... only."""
    import ablation_directpred as dp
    changed = []

    def each(step, s, before):
        pred = s.model.predictor.weight
        if not torch.equal(pred, before["predictor.weight"]):
            changed.append(step)
            eig, u = torch.linalg.eigh(s.model.corr)
            q = (eig.clamp_min(0) / eig.max()).sqrt() + dp.EPS
            assert torch.allclose(pred, u @ torch.diag(q) @ u.T, atol=1e-5)
        assert not torch.equal(s.model.corr, before["corr"])   # F is averaged at every step
    s = _train_steps(SMALL, dp.DirectPredBYOL, 2 * dp.K + 2, each)
    pred = s.model.predictor
    assert all(not p.requires_grad and p.grad is None for p in pred.parameters())
    in_opt = {id(p) for g in s.opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in pred.parameters()}
    assert {id(p) for p in s.model.online_projector.parameters()} <= in_opt
    assert changed == [0, dp.K, 2 * dp.K] and "corr" in s.model.state_dict()


def test_hard_copy_example_copies_the_target_every_k_steps_and_holds_it_between(monkeypatch):
    """HardCopyBYOL: right after a step with step % K == 0 the target's weights (and buffers) are
    exactly the online network's; on the steps between, its weights do not change at all."""
    import ablation_hard_target as ht
    monkeypatch.setattr(ht, "K", 3)
    copies = []

    def each(step, s, before):
        pairs = _pairs(s.model, buffers=True)
        if step % 3 == 0:
            copies.append(step)
            assert all(torch.equal(t, o) for _, t, o in pairs)
        else:
            weights = _pairs(s.model)
            assert all(torch.equal(t, before[n]) for n, t, _ in weights)
            assert not all(torch.equal(t, o) for _, t, o in weights)   # the online network moved on
        assert not all(torch.equal(o, before[n.replace("target", "online", 1)]) for n, _, o in _pairs(s.model))
    _train_steps(SMALL, ht.HardCopyBYOL, 7, each)
    assert copies == [0, 3, 6]


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
    assert torch.allclose(model([v1, v2])["z_std"], expected["z_std"], atol=1e-6)


def test_info_nce_and_queue():
    """contrastive.InfoNCE (Table 1's contrastive row): the loss is cross-entropy of q.k against
    the queue at temperature 0.2, both view orders; the queue is a ring buffer; after_step enqueues
    the step's target projections of v'; start fills the queue from data only when asked."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, queue_size=8, proj_dim=4)
    model = contrastive.InfoNCE(cfg)
    q = nn.functional.normalize(torch.randn(3, 4), dim=1)
    k = nn.functional.normalize(torch.randn(3, 4), dim=1)

    def hand(temperature):   # -log softmax of the positive among [q.k, q.queue_1..8] / T
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue.T], 1) / temperature
        return -(logits[:, 0] - torch.logsumexp(logits, 1)).mean()
    assert contrastive.InfoNCE.TEMPERATURE == 0.2   # MoCo v2's
    assert torch.allclose(model.info_nce(q, k), hand(0.2), atol=1e-6)
    assert torch.allclose(model.loss([q, k], [k, q], None), model.info_nce(q, q) + model.info_nce(k, k))

    class Warm(contrastive.InfoNCE):   # the temperature is a class attribute a subclass may change
        TEMPERATURE = 0.5
    warm = Warm(cfg)
    warm.queue.copy_(model.queue)
    assert torch.allclose(warm.info_nce(q, k), hand(0.5), atol=1e-6)
    assert not torch.allclose(hand(0.5), hand(0.2), atol=1e-3)
    # ring buffer: 3 + 3 + 3 keys into 8 slots wrap around
    keys = [torch.full((3, 4), float(i)) for i in range(3)]
    for key in keys:
        model.enqueue_(key)
    assert model.queue_ptr.item() == 1
    assert model.queue[:, 0].tolist() == [2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    out = dict(targets=[torch.zeros(2, 4), torch.full((2, 4), 7.0)])
    model.after_step(0, out)
    assert model.queue[1:3, 0].tolist() == [7.0, 7.0] and model.queue_ptr.item() == 3
    images = runtime.make_synthetic(16, 8)["pretrain_x"]
    random_queue = model.queue.clone()
    model.start(images, torch.Generator().manual_seed(0))   # queue_init random: left as it is
    assert torch.equal(model.queue, random_queue)
    filled = contrastive.InfoNCE(dataclasses.replace(cfg, queue_init="data", batch_size=4))
    filled.start(images, torch.Generator().manual_seed(0))
    assert filled.queue_ptr.item() == 0 and torch.allclose(filled.queue.norm(dim=1), torch.ones(8))
    assert not torch.allclose(filled.queue, contrastive.InfoNCE(cfg).queue)


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
    assert common.lr_at(0, 100, 1.0) == 1.0   # no warmup: the cosine starts at step 0
    assert common.lr_at(25, 100, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert common.lr_at(50, 100, 1.0) == pytest.approx(0.5)
    assert common.lr_at(100, 100, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert common.lr_at(150, 100, 1.0) == pytest.approx(0.0, abs=1e-12)   # held at 0 past the period
    # the blog: cosine over 320 epochs, stopped after 10 -> lr barely moves
    assert common.lr_at(10 * 410 - 1, 320 * 410, 0.8) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 10 / 320)),
                                                                      rel=1e-3)
    # set_lr: every group at the cosine x its lr_mult, returned for the CSV
    model = common.BYOL(dataclasses.replace(SMALL, lr=2.0))
    opt = common.LARS([dict(params=[model.predictor[0].weight], lr_mult=3.0), dict(params=[model.predictor[0].bias])],
                      lr=2.0)
    assert model.set_lr(opt, 25, 100) == common.lr_at(25, 100, 2.0)
    assert [g["lr"] for g in opt.param_groups] == [3.0 * common.lr_at(25, 100, 2.0), common.lr_at(25, 100, 2.0)]


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
        return {n for g in common.default_param_groups(model, cfg) if g["lars"] for n in g["names"]}

    def decayed(cfg):
        return {n for g in common.default_param_groups(model, cfg) if g["weight_decay"] > 0 for n in g["names"]}
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
    every = dataclasses.replace(lars, lars_params="every")   # the blog's code: an empty exclude list
    assert adapted(every) == trainable and decayed(every) == trainable


def test_blog_lars_never_moves_a_zero_parameter_it_adapts():
    """The blog's trust eta |w| / (|g| + wd |w|) is 0 at |w| = 0: a zero-initialised bias adapted
    by LARS (lars_params every) stays 0, where DeepMind's form moves it as SGD would."""
    for form, moves in (("blog", False), ("byol", True)):
        w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.zeros(4))
        opt = common.LARS([dict(params=[w, b], lars=True, weight_decay=1e-4)], lr=0.5, eta=1e-3, form=form)
        (w @ torch.randn(3) + b).pow(2).sum().backward()
        w0 = w.detach().clone()
        opt.step()
        assert b.abs().sum().item() > 0 if moves else torch.equal(b, torch.zeros(4))
        assert not torch.equal(w, w0)


# ---------------------------------------------------------------------- augmentations

def _params(n, seed=0, size=32):
    return augment.sample_aug_params(n, size, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_augmentation_is_drawn_per_image_and_per_view():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(64, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    mean, std = augment.mean_std("synthetic", "cpu")
    v1 = augment.augment(x, gen, mean, std)
    v2 = augment.augment(x, gen, mean, std)
    assert v1.shape == (64, 3, 32, 32)
    flat = v1.flatten(1)
    distinct = torch.cdist(flat, flat) + torch.eye(64) * 1e9
    assert distinct.min() > 1e-3                    # no two copies of the image got the same view
    assert (v1 - v2).flatten(1).norm(dim=1).min() > 1e-3


def test_two_views_in_one_pass_are_two_augment_calls():
    """two_views applies both views in one pass over a double batch: the same random draws in the
    same order, and bitwise the same images, as two augment() calls on a rank's part of the batch."""
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = augment.mean_std("synthetic", "cpu")
    views = common.view_settings(dataclasses.replace(SMALL, **presets.BYOL_AUG))
    part = slice(16, 40)
    gen = torch.Generator().manual_seed(0)
    ref = [augment.augment(x, gen, mean, std, part, **v) for v in views]
    ref_next = torch.rand(1, generator=gen)
    gen = torch.Generator().manual_seed(0)
    ours = augment.two_views(x, gen, mean, std, part, views=views)
    assert [o.shape for o in ours] == [(24, 3, 32, 32)] * 2
    assert all(torch.equal(o, r) for o, r in zip(ours, ref)) and not torch.equal(*ours)
    assert torch.equal(torch.rand(1, generator=gen), ref_next)     # the stream goes on as before


def test_the_augmentation_compiles_as_one_graph():
    """--compile compiles apply_aug: dynamo must trace it whole (fullgraph raises at a graph break,
    e.g. a .item() or a branch on a tensor's value, which would be a host sync on CUDA). The eager
    backend checks the trace without the minute of C++ codegen inductor takes on a CPU."""
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = augment.mean_std("synthetic", "cpu")
    params = _params(8)
    traced = torch.compile(augment.apply_aug, backend="eager", fullgraph=True, dynamic=False)
    assert torch.equal(traced(x, params, mean, std), augment.apply_aug(x, params, mean, std))


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
    ours = augment.resized_crop_flip(img, p["box"], p["flip"], 32)
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
        ours = augment.color_jitter(img, factors, order, torch.ones(8, dtype=torch.bool))
        for i in range(8):
            assert torch.allclose(ours[i], ref_fn(img[i], factor[i].item()), atol=1e-5), (op, i)
    gray = augment.grayscale(img).expand_as(img)
    assert torch.allclose(gray, TF.rgb_to_grayscale(img, 3), atol=1e-6)


def test_solarize_matches_torchvision_and_is_applied_per_image():
    img = _images(8)
    assert torch.allclose(augment.solarize(img), TF.solarize(img, 0.5), atol=1e-7)
    mean, std = augment.mean_std("synthetic", "cpu")
    params = _params(8)
    params["solarize"] = torch.tensor([True, False] * 4)
    x = (img * 255).round().to(torch.uint8)
    on, off = (augment.apply_aug(x, dict(params, solarize=m), mean, std)
               for m in (params["solarize"], torch.zeros(8, dtype=torch.bool)))
    assert torch.equal(on[1::2], off[1::2]) and not torch.allclose(on[0::2], off[0::2])
    expected = (augment.solarize(off * std + mean) - mean) / std
    assert torch.allclose(on[0::2], expected[0::2], atol=1e-5)


def test_views_get_their_own_augmentation_settings_at_the_asked_rates():
    """view_settings gives each view its own crop scale and blur and solarize rates (here the
    BYOL paper's asymmetric recipe), and both the blog's colour jitter; each view's parameters are
    drawn independently of the other's, per image, at the asked-for rates. The blog's settings (the
    default) draw no solarize, so their random stream is what it was before solarize existed."""
    cfg = dataclasses.replace(SMALL, **presets.BYOL_AUG)
    v, v2 = common.view_settings(cfg)
    assert v["p_blur"] == 1.0 and v2["p_blur"] == 0.1 and v["p_solarize"] == 0.0 and v2["p_solarize"] == 0.2
    assert v["scale"] == (0.08, 1.0) and v2["scale"] == (0.08, 1.0)
    assert "jitter" not in v and "jitter" not in v2   # sample_aug_params' default: the blog's strength
    gen = torch.Generator().manual_seed(0)
    n = 20000
    p1, p2 = (augment.sample_aug_params(n, 32, gen, torch.device("cpu"), **s) for s in (v, v2))
    for p, blur, sol in ((p1, 1.0, 0.0), (p2, 0.1, 0.2)):
        assert abs(p["blur"].float().mean() - blur) < 0.01 and abs(p["solarize"].float().mean() - sol) < 0.01
    area = p1["box"][:, 2] * p1["box"][:, 3] / 32 ** 2
    assert area.min() < 0.1 and area.min() >= 0.07                           # down to 8%
    assert p2["factors"][:, 0].min() < 0.61 and p2["factors"][:, 0].max() > 1.39   # the blog's 0.4
    # independent: v's solarize/blur draws say nothing about v''s
    both = (p2["solarize"] & (p1["flip"])).float().mean()
    assert abs(both - 0.2 * 0.5) < 0.01
    default = augment.sample_aug_params(64, 32, torch.Generator().manual_seed(1), torch.device("cpu"))
    again = augment.sample_aug_params(64, 32, torch.Generator().manual_seed(1), torch.device("cpu"), p_solarize=0.0)
    assert not default["solarize"].any() and all(torch.equal(default[k], again[k]) for k in default)
    assert dataclasses.replace(SMALL, aug_blur=0.3).aug_blur == (0.3, 0.3)   # one value: both views


def test_color_jitter_random_order_matches_sequential_torchvision():
    img = _images(12)
    p = _params(12, seed=3)
    p["jitter"][:2] = False
    ours = augment.color_jitter(img, p["factors"], p["order"], p["jitter"])
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
    k = augment.blur_kernel_size(size)
    ours = augment.gaussian_blur(img, sigma, apply, k)
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
    data = runtime.make_synthetic(64, 256)
    enc = common.BYOL(SMALL).online_encoder
    cpu = torch.device("cpu")
    fp32 = common.linear_probe(enc, data, dataclasses.replace(SMALL, precision="fp32"))
    assert common.linear_probe(enc, data, dataclasses.replace(SMALL, precision="bf16")) == fp32


def _tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_tf32_is_off_where_fp32_is_promised(monkeypatch):
    """cuDNN runs fp32 convolutions as TF32 unless told not to: the probe's features and
    precision=fp32 training turn TF32 off (convolutions and matmuls) and restore the flags after;
    bf16 training leaves them as they were. The flags are readable on any machine."""
    before = _tf32_flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check_tf32_scopes(monkeypatch)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _check_tf32_scopes(monkeypatch):
    seen = []
    enc = common.BYOL(SMALL).online_encoder
    real_forward = enc.forward
    monkeypatch.setattr(enc, "forward", lambda x: (seen.append(_tf32_flags()), real_forward(x))[1])
    common.extract_features(enc, runtime.make_synthetic(8, 8)["test_x"], SMALL)
    assert seen and set(seen) == {(False, False)} and _tf32_flags() == (True, True)
    real_step = common.train_step
    for precision, inside in (("fp32", (False, False)), ("bf16", (True, True))):
        seen.clear()
        monkeypatch.setattr(common, "train_step", lambda *a: (seen.append(_tf32_flags()), real_step(*a))[1])
        cfg = dataclasses.replace(SMALL, precision=precision, epochs=1, eval_every=0)
        common.train_byol(cfg, data=runtime.make_synthetic(128, 64))
        assert set(seen) == {inside} and _tf32_flags() == (True, True)


def test_probe_does_not_touch_the_encoder():
    data = runtime.make_synthetic(64, 64)
    model = common.BYOL(SMALL)
    enc = model.online_encoder.train()
    enc(torch.randn(8, 3, 32, 32))             # non-trivial running stats
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    for encoder in (enc, common.recompute_bn_stats(enc, data["test_x"][:32], SMALL)):   # the random_bn_recomputed row's
        acc = common.linear_probe(encoder, data, SMALL)
        assert set(acc) == set(common.PROBE_COLUMNS) and all(0 <= a <= 100 for a in acc.values())
        assert acc["probe_acc"] == acc["probe_liblinear"]
        assert enc.training
        for k, v in enc.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_recomputed_bn_stats_are_the_data_statistics():
    net = common.ResNet(width=4, stem="cifar", norm="bn")
    imgs = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    m, s = augment.mean_std("synthetic", "cpu")
    new = common.recompute_bn_stats(net, imgs, SMALL, batch_size=20)
    x = augment.normalize(imgs.float() / 255, m, s)
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
    _write_cifar(tmp_path / runtime.CIFAR_DIR)
    d = runtime.load_data("cifar10", str(tmp_path))
    assert d["train_x"].shape == (100, 3, 32, 32) and d["train_x"].dtype == torch.uint8
    assert d["test_x"].shape == (20, 3, 32, 32) and d["test_y"].dtype == torch.int64
    raw = pickle.load(open(tmp_path / runtime.CIFAR_DIR / "data_batch_1", "rb"), encoding="bytes")
    assert d["train_x"][0, 1, 0, 0] == raw[b"data"][0, 1024]     # planar R, G, B
    with pytest.raises(runtime.UsageError, match="looked in"):
        runtime.load_data("cifar10", str(tmp_path / "nowhere"))
    (tmp_path / runtime.CIFAR_DIR / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(runtime.UsageError, match="unreadable"):
        runtime.load_data("cifar10", str(tmp_path))


def test_stl10_loader_reads_the_binary_layout(tmp_path):
    folder = tmp_path / runtime.STL_DIR
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for s, n in
              (("train", 4), ("test", 6), ("unlabeled", 3))}
    for split, x in images.items():
        # STL-10 stores (N, C, W, H): column-major per channel
        x.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
    for split, n in (("train", 4), ("test", 6)):
        np.arange(1, n + 1, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    d = runtime.load_data("stl10", str(tmp_path))
    assert d["pretrain_x"].shape == (7, 3, 96, 96)
    assert torch.equal(d["test_x"], torch.from_numpy(images["test"]))
    assert torch.equal(d["pretrain_x"][4:], torch.from_numpy(images["unlabeled"]))
    assert d["train_y"].tolist() == [0, 1, 2, 3]                 # 1..10 on disk -> 0..9
    (folder / "test_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(runtime.UsageError, match="whole number"):
        runtime.load_data("stl10", str(tmp_path))


# ------------------------------------------------------------------- training loop

def test_seeded_training_is_reproducible_and_seed_dependent():
    data = runtime.make_synthetic(256, 128)
    cfg = dataclasses.replace(SMALL, epochs=1, eval_every=1)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    a = strip(common.train_byol(cfg, data=data))
    b = strip(common.train_byol(cfg, data=data))
    c = strip(common.train_byol(dataclasses.replace(cfg, seed=1), data=data))
    assert a == b
    assert a[-1]["loss"] != c[-1]["loss"]
    assert [r["epoch"] for r in a] == [0, 1] and a[0]["loss"] is None and a[1]["probe_acc"] is not None


def _imports(name):
    """Every repo module a file imports, at its top or inside a function."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = ({a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
             | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module})
    return found & {p.stem for p in ROOT.glob("*.py")}


def test_no_import_cycle_among_the_repos_modules():
    """No repo module imports, directly or through others, itself: the library stands in layers
    (augment, logreg, runtime under common; common under harness, contrastive, instruments; the
    scripts on top). Any import counts, at a file's top or inside a function."""
    graph = {p.stem: _imports(p.stem) for p in ROOT.glob("*.py")}
    done, path = set(), []

    def visit(m):   # depth-first; a module met again on the current path closes a cycle
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m not in done:
            path.append(m)
            for n in sorted(graph[m]):
                visit(n)
            path.pop()
            done.add(m)
    for m in sorted(graph):
        visit(m)
    assert _imports("runtime") == set() and _imports("augment") == set() and _imports("logreg") == set()


def test_the_research_code_stands_on_its_own():
    """common.py imports, of the repo's modules, only the library under it (runtime.py, augment.py,
    logreg.py), which imports nothing of the repo (no harness, no script); and
    train_byol runs from a Config alone, as in a notebook: one process, no checkpoint, the synthetic
    data made, the device picked, the harness and every script never imported. (The same call at
    the default width, Config(dataset="synthetic", epochs=1), takes minutes on 2 cores; this one is
    narrower.)"""
    library = {"common", "runtime", "augment", "logreg"}
    repo = {p.stem for p in ROOT.glob("*.py")}
    assert library <= repo
    assert _imports("common") == library - {"common"}
    for name in library - {"common"}:
        assert _imports(name) == set(), name
    code = ("import sys\nfrom common import Config, train_byol\n"
            "rows = train_byol(Config(dataset='synthetic', epochs=1, width=4, mlp_hidden_dim=32, proj_dim=16, "
            "batch_size=64))\nprint([r['epoch'] for r in rows], rows[-1]['probe_acc'] > 0, 'harness' in sys.modules)\n"
            f"print(sorted(set(sys.modules) & set({sorted(repo)!r})))")
    r = conftest.run([sys.executable, "-c", code], cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-3] == "[0, 1] True False"
    assert r.stdout.split("\n")[-2] == str(sorted(library))   # no script, no harness, not even presets


AVX2_STEP = """
import torch, common, runtime
torch.set_num_threads(1)   # one thread: the out-of-bounds write crashes instead of hanging
cfg = common.Config(dataset="synthetic", width=4, mlp_hidden_dim=32, proj_dim=16, batch_size=64, epochs=1,
                    train_subset=64, eval_every=0, device="cpu")
rows = common.train_byol(cfg, data=runtime.make_synthetic(64, 64))
print("loss", rows[-1]["loss"])
"""


def test_no_avx2_crash_at_a_narrow_width(tmp_path):
    """Regression: at width 4 the stride-2 1x1 shortcut conv has 4 input channels; in channels_last
    its weight gradient ran oneDNN's jit_1x1:avx2 kernel, which writes out of bounds (a double
    free here, a hang with several threads). Capping the ISA at AVX2 picks that kernel on any
    x86 CPU. Before the fix this subprocess died with SIGABRT."""
    (tmp_path / "step.py").write_text(AVX2_STEP)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    r = conftest.run([sys.executable, str(tmp_path / "step.py")], timeout=120, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert math.isfinite(float(r.stdout.split()[-1]))


def test_conv_format_channels_last_only_where_safe():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert common.conv_format(cpu, 16) == common.conv_format(cpu, 64) == torch.channels_last
    assert common.conv_format(cpu, 4) == common.conv_format(cpu, 12) == torch.contiguous_format
    assert common.conv_format(cuda, 4) == torch.channels_last


def test_image_size_area_averages_every_split():
    data = runtime.make_synthetic(8, 8)
    small = runtime.resize_images(data, 16)
    assert small["pretrain_x"].shape == (8, 3, 16, 16) and small["test_x"].shape == (8, 3, 16, 16)
    assert torch.equal(small["test_y"], data["test_y"])
    blocks = data["train_x"].float().view(8, 3, 16, 2, 16, 2).mean((3, 5))
    assert (small["train_x"].float() - blocks).abs().max() <= 0.5   # the 2x2 mean, rounded
    rows = common.train_byol(dataclasses.replace(SMALL, image_size=16, epochs=1), data=runtime.make_synthetic(64, 64))
    assert math.isfinite(rows[-1]["loss"]) and rows[-1]["probe_acc"] is not None


def test_cpu_training_flushes_denormal_floats():
    """Decayed weights of a collapsed run can underflow into denormals, ~90x slower on a CPU."""
    torch.set_flush_denormal(False)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
    common.train_byol(dataclasses.replace(SMALL, epochs=0), data=runtime.make_synthetic(64, 64))
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_training_learns_on_synthetic_data():
    """BYOL with BN MLPs lowers its loss and its features beat the untrained ones."""
    data = runtime.make_synthetic(512, 1024)
    rows = common.train_byol(dataclasses.replace(SMALL, width=8, epochs=5, eval_every=5, lr=0.4), data=data)
    assert rows[-1]["loss"] < rows[1]["loss"]
    assert rows[-1]["probe_acc"] > rows[0]["probe_acc"] + 10   # measured: +22 (seed 0), +43 (seed 1)


def test_bad_config_values_raise():
    for bad in (dict(epochs=-1), dict(proj_norm="batch"), dict(batch_size=0), dict(base_tau=1.5),
                dict(queue_size=8), dict(lars_params="some"), dict(momentum=1.0)):
        with pytest.raises(runtime.UsageError):
            check(dataclasses.replace(SMALL, **bad))
    with pytest.raises(runtime.UsageError, match="batch_size"):
        common.train_byol(dataclasses.replace(SMALL, batch_size=5000), data=runtime.make_synthetic(64, 64))


def test_lars_lr_logging_covers_only_adapted_weights():
    torch.manual_seed(0)
    model = common.BYOL(SMALL)
    for which, expected in (("layer12", {"encoder.layer1", "encoder.layer2"}),
                            ("mlp", {"projector.0", "projector.3", "predictor.0", "predictor.3"})):
        opt = common.LARS(common.default_param_groups(model, dataclasses.replace(SMALL, optimizer="lars", lars_params=which)),
                          lr=0.5, eta=1e-3)
        model(_views(8))["loss"].backward()
        opt.step()
        logged = common.lars_lrs(opt)
        assert set(logged) == {f"lars_lr:{k}" for k in expected}
        assert all(v > 0 for v in logged.values())
        model.zero_grad()


def test_bf16_autocast_runs_only_the_encoders_in_bf16():
    model = common.BYOL(SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_views(8))
        y = model.online_encoder(torch.randn(8, 3, 32, 32))
        z, p = model.online(torch.randn(8, 3, 32, 32))
        t = model.target(torch.randn(8, 3, 32, 32))
    assert y.dtype == torch.bfloat16                      # the encoders do run in bf16
    assert z.dtype == p.dtype == t.dtype == torch.float32   # projector and predictor do not
    assert all(out[k].dtype == torch.float32 for k in ("loss", "pos_cos", "neg_cos", "z_std"))
    cpu = torch.device("cpu")
    assert not runtime.use_bf16(SMALL, cpu) and runtime.use_bf16(dataclasses.replace(SMALL, precision="bf16"), cpu)
    with pytest.raises(runtime.UsageError):
        check(dataclasses.replace(SMALL, precision="fp16"))




def test_checkpoints_after_the_first_epoch_then_at_most_every_interval(monkeypatch, tmp_path):
    """The loop saves after epochs 0 and 1 (so a crash loses at most one epoch), then only once
    harness.CHECKPOINT_EVERY_S have passed since the last save (a GPU epoch takes seconds; a CPU
    epoch usually outlasts the interval, so CPU runs save every epoch)."""
    saved = []
    monkeypatch.setattr(harness, "save_checkpoint", lambda path, cfg, model, opt, gen, rows, step: saved.append(rows[-1]["epoch"]))
    cfg = dataclasses.replace(SMALL, epochs=4, eval_every=0)
    data = runtime.make_synthetic(128, 64)
    for every, expected in ((1e9, [0, 1]), (0, [0, 1, 2, 3])):
        saved.clear()
        monkeypatch.setattr(harness, "CHECKPOINT_EVERY_S", every)
        common.train_byol(cfg, data=data, checkpoint=harness.Checkpoints(tmp_path / "c.pt"))
        assert saved == expected


# ------------------------------------------- the recovery instruments (exp_recovery.py, exp_mechanism.py)

def _toy_scale_invariant_runs(scaled, lr=0.2, mu=0.9, wd=0.01, steps=300):
    """SGD with decay on a scale-invariant toy loss, beside SGD without decay (momentum mu / alpha^2,
    gradients x alpha^-(2t-1) when scaled, the initial radial momentum of the change of variables)."""
    import exp_mechanism
    g = torch.Generator().manual_seed(0)
    a_mat, b = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    w0 = torch.randn(10, generator=g, dtype=torch.float64)
    w1, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    a = exp_mechanism.alpha(lr, mu, wd)
    o1 = common.LARS([dict(params=[w1], weight_decay=wd)], lr=lr, momentum=mu)
    o2 = common.LARS([dict(params=[w2], weight_decay=0.0, momentum=mu / a ** 2 if scaled else mu)], lr=lr, momentum=mu)
    if scaled:
        o2.state[w2]["momentum_buffer"] = -(1 - a) * w0 / lr   # w~_{-1} = alpha w_{-1}
    c = 1.0
    for t in range(1, steps + 1):
        for w, o in ((w1, o1), (w2, o2)):
            o.zero_grad()
            (a_mat @ (w / w.norm()) - b).pow(2).sum().backward()
        c *= a ** -1 if t == 1 else a ** -2
        if scaled:
            w2.grad.mul_(c)
        o1.step()
        o2.step()
    direction_gap = 1 - torch.dot(w1 / w1.norm(), w2 / w2.norm()).item()
    return direction_gap, (w2.norm() / w1.norm()).item(), a ** -steps


def test_exponential_lr_without_decay_follows_sgd_with_decay_on_scale_invariant_weights():
    """exp_mechanism.py's control (b): Li & Arora's change of variables, as derived in its docstring,
    gives SGD with decay's directions exactly, with |w| grown by alpha^-t; unscaled, it does not."""
    gap, ratio, predicted = _toy_scale_invariant_runs(scaled=True)
    assert gap < 1e-12 and ratio == pytest.approx(predicted, rel=1e-9) and predicted > 100
    gap_plain, ratio_plain, _ = _toy_scale_invariant_runs(scaled=False)
    assert gap_plain > 1e-5 and ratio_plain < 10


def test_norm_held_model_restores_the_conv_norms_from_the_collapse_on():
    """exp_mechanism.py's control (a), in the step's stages: before the collapse nothing is held;
    after a step whose negative cosine reaches 0.999 (after_step), every later step first puts
    each conv weight back (before_step) to the norm it had in that step's forward."""
    import exp_mechanism
    model = exp_mechanism.NormHeldBYOL(SMALL)
    convs = exp_mechanism.conv_weights(model)
    model.before_step(0)
    model.after_step(0, model(_views(8)))
    assert not model.holding   # random init: far from collapse
    norms = torch.stack([w.detach().norm() for w in convs])
    model.before_step(1)
    with torch.no_grad():
        for w in convs:
            w.mul_(0.5)   # what a step with decay would do, after the forward
    model.after_step(1, dict(neg_cos=torch.tensor(0.9995)))
    assert model.holding and torch.equal(model.held_norms, norms)   # the forward's norms, not the step's
    model.before_step(2)
    assert torch.allclose(torch.stack([w.norm() for w in convs]), norms, rtol=1e-6)
    assert "held_norms" in model.state_dict() and "holding" in model.state_dict()   # survive a resume


def test_decay_on_puts_decay_only_where_named():
    import exp_mechanism
    model = exp_mechanism.decay_on("conv", "predictor.")(SMALL)
    groups = model.param_groups()
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert groups[0]["weight_decay"] == SMALL.weight_decay and groups[1]["weight_decay"] == 0.0
    assert names == {n for n, p in model.named_parameters()
                     if n.startswith("online_encoder.") and p.ndim == 4 or n.startswith("predictor.") and p.ndim == 2}
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_exp_lr_model_scales_the_conv_gradients_by_the_scheduled_lrs_alpha():
    """exp_mechanism.py's control (b): set_lr multiplies the conv weights' gradient scale by
    alpha^-1 at step 0, then alpha^-2 a step, alpha from the lr it sets; the conv weights' gradients
    are scaled by it and nothing else's."""
    import exp_mechanism
    cfg = dataclasses.replace(SMALL, weight_decay=0.0)
    model = exp_mechanism.ExpLrBYOL(cfg)
    opt = model.configure_optimizer()
    c = 1.0
    for step in range(3):
        lr = model.set_lr(opt, step, 10)
        a = exp_mechanism.alpha(lr, cfg.momentum, exp_mechanism.EXP_LR_DECAY)
        c *= a ** -1 if step == 0 else a ** -2
        assert model.grad_scale.item() == pytest.approx(c, rel=1e-12)
    torch.manual_seed(0)
    ref = common.BYOL(cfg)
    ref.load_state_dict(model.state_dict(), strict=False)
    for m in (model, ref):
        m([t.clone() for t in _views(8)])["loss"].backward()
    conv, lin = "online_encoder.conv1.weight", "online_projector.0.weight"
    grads = {n: (dict(model.named_parameters())[n].grad, dict(ref.named_parameters())[n].grad) for n in (conv, lin)}
    assert torch.allclose(grads[conv][0], c * grads[conv][1], rtol=1e-4) and torch.equal(*grads[lin])
    assert opt.param_groups[0]["momentum"] == pytest.approx(cfg.momentum / exp_mechanism.alpha(
        cfg.lr, cfg.momentum, exp_mechanism.EXP_LR_DECAY) ** 2)


def test_recovery_metrics_angle_and_rank():
    """The recovery instruments (instruments.py, logged by exp_recovery.py): the angle between two
    tensors (exact for small angles) and the effective rank (1 for a batch on a line, d for an
    isotropic one)."""
    a = torch.tensor([1.0, 0.0, 0.0])
    assert instruments.angle(a, torch.tensor([1.0, 1e-5, 0.0])) == pytest.approx(1e-5, rel=1e-6)
    assert instruments.angle(a, torch.tensor([0.0, 2.0, 0.0])) == pytest.approx(math.pi / 2)
    line = torch.randn(64, 1) * torch.randn(1, 16)
    assert common.effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    eye = torch.eye(16).repeat(4, 1)   # 4 copies of each basis vector: an isotropic spread
    assert common.effective_rank(eye) == pytest.approx(15.0, rel=0.05)   # centered: 15 live directions


# ------------------------------------------- ablations built on the stages (ablation_*.py)

def test_multicrop_views_and_loss():
    """ablation_multicrop.py: views() gives v, v' at the run's size (the default's, from the same
    draws) and two small views at half of it, each per image; the online network sees all four, the
    target v and v' only, and the loss sums each view against every other large view's target."""
    import ablation_multicrop as mc
    cfg = dataclasses.replace(SMALL, width=8)
    images = runtime.make_synthetic(64, 8)["pretrain_x"]
    runtime.set_seed(0)
    model = mc.MultiCropBYOL(cfg)
    views = model.views(images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(64, 3, 32, 32)] * 2 + [(64, 3, 16, 16)] * mc.SMALL_VIEWS
    default = common.BYOL.views(model, images, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, default))
    assert not torch.equal(views[2], views[3])   # the small views are drawn apart
    calls = []
    model.target_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1]))
    out = model(views)
    assert calls == [32, 32]
    with torch.no_grad():
        ps = [nn.functional.normalize(model.online(v)[1], dim=1) for v in views]
        ts = [nn.functional.normalize(model.target(v), dim=1) for v in views[:2]]
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    hand = sum((1 - (ps[i] * ts[j]).sum(1)).mean() for i, j in pairs)
    assert torch.allclose(out["loss"], hand, atol=1e-5)
    rows = common.train_byol(dataclasses.replace(cfg, epochs=1), data=runtime.make_synthetic(64, 64),
                             model_fn=mc.MultiCropBYOL)
    assert math.isfinite(rows[-1]["loss"])


def test_knn_probe_matches_a_brute_force_vote():
    """ablation_knn_probe.py: the weighted kNN accuracy equals a sample-by-sample computation
    (cosine similarities, the k largest, votes exp(sim / T) per label), and evaluate adds its
    columns at the linear probe's epochs only."""
    import ablation_knn_probe as kp
    g = torch.Generator().manual_seed(0)
    fit_f, val_f = torch.randn(50, 6, generator=g), torch.randn(30, 6, generator=g)
    fit_y, val_y = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (30,), generator=g)
    for k in (1, 5, 20, 200):
        hits = 0
        for x, y in zip(val_f, val_y):
            sims = [(torch.dot(x, f) / (x.norm() * f.norm())).item() for f in fit_f]
            top = sorted(range(50), key=lambda i: -sims[i])[:min(k, 50)]
            votes = [sum(math.exp(sims[i] / kp.T) for i in top if fit_y[i] == c) for c in range(4)]
            hits += max(range(4), key=votes.__getitem__) == y.item()
        assert kp.knn_accuracy(fit_f, fit_y, val_f, val_y, k, 4) == pytest.approx(100 * hits / 30), k
    cfg = dataclasses.replace(SMALL, epochs=2, eval_every=2)
    rows = common.train_byol(cfg, data=runtime.make_synthetic(64, 64), model_fn=kp.KNNProbeBYOL)
    assert [sorted(k for k in r if k.startswith("knn_")) for r in rows] == [["knn_20", "knn_200"], [],
                                                                             ["knn_20", "knn_200"]]


def test_predictor_warmup_logs_the_lr_each_step_used(monkeypatch):
    """ablation_predictor_warmup.py: the predictor's lr rises linearly to the base lr over
    WARMUP_STEPS steps, then holds, while the rest follows the cosine; the CSV's lr:predictor is
    the lr the optimizer used in the epoch's last step."""
    import ablation_predictor_warmup as pw
    monkeypatch.setattr(pw, "WARMUP_STEPS", 3)
    used = []

    class Recorded(pw.PredictorWarmupBYOL):
        def configure_optimizer(self):
            opt = super().configure_optimizer()
            real = opt.step
            opt.step = lambda: used.append({g.get("label"): g["lr"] for g in opt.param_groups}) or real()
            return opt
    cfg = dataclasses.replace(SMALL, epochs=3, eval_every=0, lr=0.4)
    rows = common.train_byol(cfg, data=runtime.make_synthetic(128, 64), model_fn=Recorded)   # 2 steps an epoch
    assert [u["predictor"] for u in used] == pytest.approx([0.4 / 3, 0.8 / 3, 0.4, 0.4, 0.4, 0.4])
    assert [u[None] for u in used] == pytest.approx([common.lr_at(k, 6, 0.4) for k in range(6)])
    assert [r["lr:predictor"] for r in rows] == [None] + [used[2 * e - 1]["predictor"] for e in (1, 2, 3)]


def test_simsiam_vit_has_no_target_network_and_trains():
    """ablation_simsiam_vit.py: EMA_PAIRS = () makes no target network; at tau 0 forward takes the
    online projections under a stop-gradient; the ViT gives y of 8 x width, and a run is finite."""
    import ablation_simsiam_vit as sv
    cfg = dataclasses.replace(SMALL, base_tau=0.0)
    model = sv.SimSiamViT(cfg)
    assert model.target_is_online and not any(n.startswith("target_") for n, _ in model.named_parameters())
    assert model.online_encoder(torch.randn(2, 3, 32, 32)).shape == (2, 8 * cfg.width)
    out = model(_views(8))
    assert all(not t.requires_grad for t in out["targets"])
    out["loss"].backward()
    assert model.online_encoder.patches.weight.grad.abs().sum() > 0
    rows = common.train_byol(dataclasses.replace(cfg, epochs=1), data=runtime.make_synthetic(64, 64),
                             model_fn=sv.SimSiamViT)
    assert math.isfinite(rows[-1]["loss"]) and rows[-1]["probe_acc"] > 0


def _code_lines(path):
    """Lines of code: not blank, not a comment, not in a docstring."""
    import io
    import tokenize
    src = path.read_text()
    docs = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            docs.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    lines = {n for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type not in skip
             for n in range(t.start[0], t.end[0] + 1)}
    return len(lines - docs)


def test_the_core_and_the_stage_examples_keep_their_sizes():
    """What a researcher reads stays short (issue 42): common.py <= 700 lines with BYOL in its
    first 35%, train_byol <= 50 lines, Config <= 36 fields, and each ablation that shows a stage
    <= 25 lines of code."""
    import inspect
    lines = (ROOT / "common.py").read_text().splitlines()
    assert len(lines) <= 700
    assert next(i for i, line in enumerate(lines) if line.startswith("class BYOL(")) < 0.35 * len(lines)
    assert len(inspect.getsource(common.train_byol).splitlines()) <= 50
    assert len(dataclasses.fields(common.Config)) <= 36
    for name in ("multicrop", "knn_probe", "predictor_warmup", "simsiam_vit"):
        assert _code_lines(ROOT / f"ablation_{name}.py") <= 25, name
