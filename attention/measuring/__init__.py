"""Measuring a result: the papers' metrics and the pictures that show them.

    metrics.py  cosine matrices, the scales each paper reports (cosine, 100·cos, 1 − cos), pairing
    plots.py    line plots (loss curves, a metric against a swept value) and labelled grids as IMAGEs

Which paper computes which metric how is in ``nodes/metrics.py``, where open_clip is run.
"""
