"""Evaluation: simulated and live benchmark runs, policy comparisons, simulator validation."""
