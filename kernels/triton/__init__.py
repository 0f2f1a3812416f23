"""Triton kernels, each beside its PyTorch reference in `kernels/pytorch/`.

Triton compiles a kernel for the GPU, or runs it in its CPU interpreter when the environment
variable TRITON_INTERPRET=1 is set before triton is imported: the choice is made once per
process, for Triton's own library functions as much as for ours. The dispatchers in
`kernels/` check which mode this process is in and say so when it cannot serve a call.
"""
