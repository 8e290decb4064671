"""Built-in passes; importing this package registers them (``qgraph passes`` lists them)."""

from . import fuse_norms, gptq, quantize, rotate  # noqa: F401
