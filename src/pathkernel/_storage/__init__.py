"""Where data comes from and where kernels go: input ``sources``, ``checkpoints``, tile
``store``s (RAM or a resumable ``.npy``)."""
