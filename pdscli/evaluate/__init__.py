"""Evaluation: models with a known answer (`analytic`, `mixture`), the samplers' exact moments on them
(`moments`), the one Gaussian KL (`divergence`), quality measures (`measures`), the built-in model's
classifier check (`digits`), and FID / KID (`fid`, `features`, `imagesets`, `compare`).

Imports the base layer, samplers and precondition, and for the digits check the built-in model and
the digits data set (`models`, `train.datasets`); `sample`, `bench`, `api` and `cli` import it."""
