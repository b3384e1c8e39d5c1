"""``python -m hf_hybrid_sparse.cli``: the same as the ``hf-hybrid-sparse`` console script."""

import sys

from .dispatch import main

sys.exit(main())
