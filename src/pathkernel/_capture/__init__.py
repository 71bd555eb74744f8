"""Per-example features: which rule covers each parameter (``plan``, ``rules``), capturing
the factors during a forward/backward pass (``hooks``, ``extract``), the dense path
(``dense``), the per-example check of the factors against autograd (``probe``), and blocks of
features paired into native terms (``blocks``). ``extract.tangent_batches`` is the seam the
drivers and the benchmarks use."""
