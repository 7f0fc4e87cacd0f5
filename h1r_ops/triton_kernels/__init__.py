"""h1r_ops.triton_kernels"""
