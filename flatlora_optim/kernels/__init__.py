"""Optional fused GPU kernels (Triton). Imported only on CUDA devices when Triton is installed."""
