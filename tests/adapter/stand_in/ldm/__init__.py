"""Stand-in ``ldm`` (Stability-AI/stablediffusion at cf1d67a6, the webui v1.10.1's
``repositories/stable-diffusion-stability-ai``): the U-Net the webui builds for an SD 2.x-layout checkpoint.

Written for the tests, not copied: the module tree, class names, constructor arguments, ``forward`` signatures and
parameter names are ldm's (so released-layout checkpoints load with ``strict=True`` and our hooks meet the same
modules as in the webui); only the SD 2.x path is implemented (spatial transformers, no class conditioning, no
``AttentionBlock``).
"""
