"""Evaluation helpers: CMC/mAP plots and reports on top of fastassoc.evaluate_ranking."""
