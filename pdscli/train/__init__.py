"""`pds train`: score_sde's continuous VE denoising score matching, EMA, exact resume, and the data sets.

Imports the base layer and models; `cli`, scripts, and the digits data set's users (`evaluate.digits`,
`bench.quality`) import it."""
