"""Beyond the blog: what sets how deep a collapse goes (our collapses ran far deeper than the
blog's).

The blog's collapsed runs stay shallow: D1's training loss bottoms out near 1e-4 (epoch 60) and
D2's near 1e-3 (SPEC.md, Appendix D). Each variant here changes one lever of the steps preset,
for two collapsing networks, and runs ~936 steps (12 epochs of 78 steps), probing once, at the end:

    c1_*   BN encoder, SGD lr 0.8, wd 1e-4 on every parameter, no MLP norm   (Appendix C1)
    d1_*   GroupNorm encoder, SGD lr 0.2, wd 1e-5, no norm anywhere else       (Appendix D1)

    lever        change from the steps preset (width 8, 16 px, 5k images, batch 64)
    base         none
    wd_weights   (c1) no decay on biases and norm gains (decay_params=weights)
    wd_conv      (c1) decay on the encoder's conv weights only (decay_params=conv)
    sqdist       loss computed as 1/2 |q - z'|^2 (SqDistBYOL): same value, no cancellation
    gn4          (d1) GroupNorm with 4 groups: the blog's 2-16 channels a group (32 is InstanceNorm
                 in layers 1-3 at width 8)
    tau0.99      (d1) a faster target (the cpu preset's tau)
    lrB_b64      lr / 4 and wd x 4 at batch 64: the blog's lr/B and decay per step
    lrB_b256     the blog's own lr and wd at batch 256 (20k images, so 78 steps an epoch again)
    n50k         all 50k training images (2 epochs of 781 steps)
    w16, w32     width 16, 32
    px32         CIFAR-10 at its own 32 px

Depth = the last epoch's training loss and neg_gap (1 - negative cosine computed without
cancellation, common.collapse_stats), with z_std beside them. Choices: the steps preset's tau
0.996, 12 epochs (n50k: 2 epochs, 1,562 steps); lrB_b64/lrB_b256 keep lr x wd per step; no lever
is tuned.

Expect: a lever that sets the depth moves the last loss and neg_gap beyond the seeds' spread.
Results: results/README.md#why-the-recoveries-happen (the levers' table) and #beyond-the-blog

    python exp_collapse_depth.py --preset steps --seeds 2
    python plot_results.py --depth runs/collapse_depth_steps.csv
"""
import common
import harness
import presets


class SqDistBYOL(common.BYOL):
    """The blog's loss as 1/2 |q - z'|^2 of unit vectors: the same number, and gradients, as
    1 - cos, without fp32's cancellation of 1 - cos near 1."""

    def loss(self, ps, ts, zs):
        return 0.5 * sum((p - t).pow(2).sum(1).mean() for i, p in enumerate(ps) for j, t in enumerate(ts) if i != j)

C1 = dict(encoder_norm="bn", proj_norm="none", pred_norm="none", lr=0.8, weight_decay=1e-4)
D1 = dict(encoder_norm="gn", proj_norm="none", pred_norm="none", lr=0.2, weight_decay=1e-5)
STEPS = presets.APPENDIX_PRESETS["steps"]
# at 781 steps an epoch the blog's step schedule spans BLOG_STEPS // 781 epochs
N50K = dict(train_subset=0, epochs=2, schedule_epochs=presets.BLOG_STEPS // 781)


def levers(base):
    """The levers both networks share, as overrides of base."""
    lr, wd = base["lr"], base["weight_decay"]
    return {"sqdist": dict(model_fn=SqDistBYOL), "lrB_b64": dict(lr=lr / 4, weight_decay=wd * 4),
            "lrB_b256": dict(batch_size=256, train_subset=20000), "n50k": N50K,
            "w16": dict(width=16), "w32": dict(width=32), "px32": dict(image_size=0)}


C1_LEVERS = dict(base={}, wd_weights=dict(decay_params="weights"), wd_conv=dict(decay_params="conv"))
D1_LEVERS = dict(base={}, gn4=dict(gn_groups=4), tau099=dict(base_tau=0.99))
# the most telling levers first, so that an interrupted grid has them
VARIANTS = {**{f"c1_{k}": dict(C1, **v) for k, v in C1_LEVERS.items()},
            **{f"d1_{k}": dict(D1, **v) for k, v in D1_LEVERS.items()},
            **{f"c1_{k}": dict(C1, **v) for k, v in levers(C1).items()},
            **{f"d1_{k}": dict(D1, **v) for k, v in levers(D1).items()}}
PRESETS = dict(presets.APPENDIX_PRESETS, steps=dict(STEPS, epochs=12, eval_every=0))

if __name__ == "__main__":
    harness.main("collapse_depth", __doc__, PRESETS, VARIANTS)
