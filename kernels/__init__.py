"""Fused kernels of the HSTU model, each a dispatch function over a Triton kernel and its PyTorch reference.

    from kernels.hstu_attention import hstu_attention          # jagged HSTU attention
    from kernels.sampled_softmax import sampled_softmax_loss   # fused retrieval loss

Triton runs on CUDA tensors, the reference elsewhere; `impl=` or HSTU_KERNEL_IMPL forces one
(see kernels/_dispatch.py).
"""
