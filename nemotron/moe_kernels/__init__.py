"""LatentMoE kernels (to come): fp32 sigmoid router, permute/dispatch, grouped GEMM (bf16 and NVFP4),
combine, and expert-parallel all-to-all of latent vectors."""
