"""The pieces every layer of ctssl shares: storage (local paths and object storage), user-facing errors,
progress bars, crash-injection failpoints, name -> plug-in registries and the Ray connector.

``data_prep``, ``ssl_core`` and ``ray_jobs`` all build on this package, so it imports nothing of theirs,
and importing it imports neither Ray nor torch (modules that need Ray import it inside functions).
tests/test_package_edges.py checks these rules.
"""
