"""The public entry points: ``tangent``, ``path_kernel`` (planned by ``tiling``), the
``recorder`` of a training loop (with ``optim``) and the ``machine`` it yields, and the
scikit-learn helpers."""
