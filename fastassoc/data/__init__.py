"""Tracklet datasets: synthetic world, on-disk layouts, samplers."""
