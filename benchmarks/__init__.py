"""statepool's benchmark suite: ``python -m benchmarks --help``.

Every figure is taken for statepool and for the libraries a user would otherwise pick (raw
asyncio, ``run_in_executor`` with thread and process pools, loky, aiomultiprocess, joblib, Dask)
in the same run, as the median of several repetitions after a warm-up, and reported as a ratio
to its baseline. See the README, section Benchmarks.
"""

from __future__ import annotations

__all__: list[str] = []
