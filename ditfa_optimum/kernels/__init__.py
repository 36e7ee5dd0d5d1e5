"""Triton kernels, one family a file, no diffusers import; installed as `ditfa_optimum.kernels`.

`headwise_attention`: a layer's whole mixed head-wise plan in one launch (the runtime's "triton" backend,
`ditfa_optimum.runtime.triton_backend`).
"""
