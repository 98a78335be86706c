"""The blog's contrastive row of Table 1 ("xent", its MoCo-style config): InfoNCE of each view's
online prediction against the other view's target projection, with a queue of earlier target
projections as the negatives. A BYOL subclass built on its stages (common.BYOL): loss, after_step
(the queue takes the step's target projections of v', every rank's) and start (the queue's
first keys). Settings: Config.queue_size and queue_init; the temperature is MoCo v2's."""
import torch
import torch.nn.functional as F

import common
from augment import augment
from runtime import process_group


class InfoNCE(common.BYOL):
    TEMPERATURE = 0.2   # MoCo v2's

    def __init__(self, cfg, image_size=32):
        super().__init__(cfg, image_size)
        # memory bank of target projections z' (MoCo): random unit vectors at first, the blog's
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def start(self, images, gen):
        """queue_init data: the queue starts as target projections of augmented views v' of real
        images (with random unit vectors, the collapsed keys of a collapsing network can stall the
        gradient)."""
        if self.cfg.queue_init != "data":
            return
        idx = torch.randperm(len(images), generator=gen, device=images.device)[:len(self.queue)]
        fmt, view = common.conv_format(images.device, self.cfg.width), common.view_settings(self.cfg)[1]
        for chunk in idx.split(self.cfg.batch_size):
            v = augment(images[chunk], gen, self.mean, self.std, fmt=fmt, **view)
            self.enqueue_(F.normalize(self.target(v).float(), dim=1))

    def loss(self, ps, ts, zs):
        """InfoNCE of each view's prediction against every other view's target, both orders."""
        return sum(self.info_nce(p, t) for i, p in enumerate(ps) for j, t in enumerate(ts) if i != j)

    def info_nce(self, q, k):
        """Cross-entropy of the positive q.k against q.queue (the negatives)."""
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], 1) / self.TEMPERATURE
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

    def after_step(self, step, out):
        """The step's target projections of v' join the queue: every rank's, in rank order."""
        self.enqueue_(process_group().gather(out["targets"][1]))

    @torch.no_grad()
    def enqueue_(self, keys):
        """Writes keys into the queue ring buffer (no host sync)."""
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))
