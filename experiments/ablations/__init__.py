"""Ablation scripts: each runs a sweep at tiny scale and writes a markdown table and a plot to
experiments/results/<ablation>/. See docs/research.md, "Writing an ablation"."""
