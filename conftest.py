"""The suite runs on the CPU everywhere: on a GPU machine CUDA would pick other kernels
(bitwise reruns, torchrun's rank-to-GPU mapping, NCCL tolerances). Hiding the GPUs here, before
torch is imported, covers the tests and every subprocess they start."""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
