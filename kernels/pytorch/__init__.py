"""PyTorch references of the kernels: the CPU path and the test oracle for the Triton kernels."""
