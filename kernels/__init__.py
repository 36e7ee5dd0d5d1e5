"""Triton kernels, one family a file, no diffusers import; installed as `ditfa_optimum.kernels`.

The fused head-wise attention kernel lands here (see the runtime's backend registry for where it plugs in).
"""
