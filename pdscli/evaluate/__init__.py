"""Evaluation: models with a known answer (the analytic Gaussian), their exact moments, and quality measures.

Imports the base layer, samplers and precondition; nothing below it imports this package."""
