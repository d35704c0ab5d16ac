"""`pds train`: score_sde's continuous VE denoising score matching, EMA, exact resume, and the data sets.

Imports the base layer and models; only `cli` and scripts import it."""
