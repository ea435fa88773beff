"""Reference kernels in pure PyTorch, each with an optional fast path behind one ``backend``
switch (DESIGN.md §2: reference first, fast path optional)."""
