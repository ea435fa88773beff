"""perseq: efficient, personalized, privacy-preserving sequential recommendation."""
from .runtime import limit_openmp_spin as _limit_openmp_spin

__version__ = "0.1.0"

# before anything imports torch (runtime.py imports neither torch nor numba): torch's
# OpenMP workers then stop spinning sooner and leave the cores to perseq's numba kernels
_limit_openmp_spin()
