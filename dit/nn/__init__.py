"""The nn core: attention (one module, many kernels), blocks, embeddings, normalization, MoE, token packing and
masking, text padding, and the per-forward :class:`~dit.nn.context.BlockContext`. Imports nothing above it."""
