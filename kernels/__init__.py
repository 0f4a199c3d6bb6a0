"""ecserve's Triton kernels, each beside a plain-torch reference twin (see README.md).

This folder installs as `ecserve_kernels` (not `kernels`, which is an unrelated PyPI package).
It never imports `ecserve`: the engine depends on the kernels, not the other way round.
"""

__all__: list[str] = []
