"""The presets the scripts share (SPEC.md section 2), and two bundles of settings a variant adds:
the BYOL paper's LARS (LARS_BYOL) and its asymmetric augmentations (BYOL_AUG). Each script adds
its own epochs and settings. A preset is a dict of common.Config fields."""
# Settings the scripts' presets share (SPEC.md section 2); each script adds epochs and its own.
# blog: the blog's STL-10 runs. cifar10: the same recipe on CIFAR-10, for a GPU. cpu: minutes on
# 2 cores (chosen by measurement, README "The CPU preset"): a narrow CIFAR-stem ResNet-18 on the
# first 10k CIFAR-10 images; batch 64 gives 4x the steps of 256 at the same images/s on 2 cores.
BLOG_STL10 = dict(dataset="stl10", stem="imagenet", width=64, batch_size=256, lr=0.8, weight_decay=1e-4,
                  base_tau=0.996, queue_size=65536)

CIFAR10_GPU = dict(BLOG_STL10, dataset="cifar10", stem="cifar", queue_size=16384, eval_every=5)   # probe: 1 in 5

CPU_SMALL = dict(dataset="cifar10", stem="cifar", width=16, train_subset=10000, batch_size=64, lr=0.1,
                 weight_decay=1e-4, base_tau=0.99, queue_size=4096, queue_init="data")

# Table 1's presets (10 epochs of the blog's 320-epoch schedule), shared by every script built on
# Table 1 (exp_table1_norms.py, exp_bn_anatomy.py, bench.py, the ablations). cpu: 12 epochs, lr 0.1
# and tau 0.99 (a faster target) for the short horizon (results/tuning/README.md).
TABLE1_PRESETS = {"blog": dict(BLOG_STL10, epochs=10, schedule_epochs=320),
                  "cifar10": dict(CIFAR10_GPU, epochs=10, schedule_epochs=320),
                  "cpu": dict(CPU_SMALL, epochs=12, schedule_epochs=320)}

# The appendix scripts' presets: 320 epochs, as the blog's appendix runs. cpu: the first 8 epochs
# of that 320-epoch schedule (lr and tau as at the start of a long run) on 5k images (78 steps
# each): what collapses early can show, recoveries at epoch 10-100 cannot.
# steps: the appendix's recoveries on a CPU. The cpu preset made smaller for steps per second
# (width 8, CIFAR-10 at 16 px, 5k images, batch 64: 78 steps an epoch; measured 15.6 steps/s on 2
# cores, against 3.6-4.1 for the cpu preset: `python bench.py --preset steps --steps 40`), run on
# the blog's own step schedule: its cosines (lr, and tau where scheduled) span the blog's 320 x 410
# steps, and it keeps the blog's lr 0.8, wd 1e-4 and tau 0.996, so that lr x wd x steps, the clock
# of the decay, reads as in the blog. Each script sets how many epochs a finding needs. Its
# GroupNorm has the default 32 groups, one channel each in layers 1-3 at width 8; the *_gn4
# variants have the blog's 2-16 channels a group. Speed: results/history/notebook.md ('A preset built for steps').
BLOG_STEPS = 320 * 410   # the blog's appendix runs: 320 epochs of 410 steps (105k STL-10 images, batch 256)

APPENDIX_PRESETS = {"blog": dict(BLOG_STL10, epochs=320), "cifar10": dict(CIFAR10_GPU, epochs=320),
                    "cpu": dict(CPU_SMALL, train_subset=5000, epochs=8, eval_every=2, schedule_epochs=320),
                    "steps": dict(CPU_SMALL, width=8, image_size=16, train_subset=5000, lr=0.8, weight_decay=1e-4,
                                  base_tau=0.996, epochs=8, eval_every=5, schedule_epochs=BLOG_STEPS // 78)}

# LARS with the BYOL paper's settings (section 3.3 and DeepMind's config: trust 1e-3, weight decay
# 1.5e-6 off biases and norms, tau 0.996 -> 1 on a per-step cosine), run through the blog's own LARS
# update (common.BYOL.configure_optimizer: the blog's appendix runs used its lars.py; see LARS)
LARS_BYOL = dict(optimizer="lars", weight_decay=1.5e-6, tau_schedule="cosine")
# The BYOL paper's asymmetric augmentations (its Table 6): crops down to 8% of the area, view v
# always blurred and never solarized, view v' blurred w.p. 0.1 and solarized w.p. 0.2. (Its
# saturation jitter is 0.2 where the blog's is 0.4; aug_jitter scales all four together, so that
# one difference stays.)
BYOL_AUG = dict(aug_crop_scale=0.08, aug_blur=(1.0, 0.1), aug_solarize=(0.0, 0.2))
