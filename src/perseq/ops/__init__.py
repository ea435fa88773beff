"""Reference kernels in pure PyTorch, each with an optional fast path behind one ``backend``
switch (DESIGN.md §2: reference first, fast path optional)."""

from contextlib import contextmanager

_reference_depth = 0


@contextmanager
def reference_ops():
    """Inside this block every op with a fast path runs its plain-torch reference line
    instead: no numba or C kernels and no custom ``autograd.Function`` (fused attention,
    chunked softmax CE, the scans, the conv). ``torch.func`` transforms (``vmap``,
    ``grad``) can trace only plain torch ops, so per-user adaptation
    (``perseq.personalize``) runs here. Values agree with the fast paths to float rounding
    (each fast path is tested against its reference)."""
    global _reference_depth
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1


def reference_only() -> bool:
    """Whether ``reference_ops`` is in force (fast-path dispatchers ask this first)."""
    return _reference_depth > 0
