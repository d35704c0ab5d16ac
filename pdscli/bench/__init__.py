"""`pds bench`: configuration, timing, backends, the measured parts, one report model and its renderers.

Imports everything below it (sample, samplers, models, engines, evaluate); only `cli` and scripts import it."""
