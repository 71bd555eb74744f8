"""The benchmark suite (``pathkernel bench``): the reference workloads of docs/design.md and
the peers they are measured against. Not part of the library: nothing in the core imports it."""
