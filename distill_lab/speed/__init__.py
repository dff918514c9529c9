"""Speed comparisons the lessons run: kernels against their float baseline, measured in one process.

Every function here times with ``distill_lab.runtime.median_seconds`` and reports ratios against a
baseline measured in the same call, because a ratio is true only for the machine it ran on.
"""
