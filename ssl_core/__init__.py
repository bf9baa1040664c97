"""Pure PyTorch + timm building blocks for self-supervised pre-training on CT.

No Ray, no file or network I/O: everything here runs in a plain Python process on a CPU, and the
distributed entry points in :mod:`ray_jobs` compose it.
"""
