"""Built-in passes; importing this package registers them (``qgraph passes`` lists them)."""

from . import (  # noqa: F401
    expand,
    fuse_norms,
    gptq,
    learn_rotations,
    learn_rounding,
    mixed_precision,
    qat,
    quantize,
    rotate,
    split_sparse,
)
