"""The sampling run: the typed job, flags -> job (each checked once), the loop over seeds, outputs, torchrun.

Imports everything below it (samplers, precondition, models, engines, evaluate); only `cli` imports it."""
