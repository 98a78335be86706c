"""The suite runs on the CPU everywhere: on a GPU machine CUDA would pick other kernels
(bitwise reruns, torchrun's rank-to-GPU mapping, NCCL tolerances). Hiding the GPUs here, before
torch is imported, covers the tests and every subprocess they start."""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np   # noqa: E402  (after the GPUs are hidden)
import pytest   # noqa: E402
import torch   # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so a threshold that passes once always passes."""
    torch.manual_seed(0)
    np.random.seed(0)
