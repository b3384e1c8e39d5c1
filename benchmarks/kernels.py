"""Hybrid packed kernels vs dense cuBLAS and torch 2:4 (Llama-2-7B shapes), packed size, e2e generate.

    python benchmarks/kernels.py [--e2e llama2-7b]     # the same as: hf-hybrid-sparse bench

The implementation lives in src/hf_hybrid_sparse/bench.py (see its docstring for what is timed and how).
"""

import sys

from hf_hybrid_sparse.bench import main

if __name__ == "__main__":
    sys.exit(main())
