"""The sampling run: `model` (the one model and filters opener), `job`, `setup` (flags -> job, each checked once), `loop`, `outputs`, `run`, `distributed`.

Imports samplers, precondition, models, engines and evaluate; `bench`, `api`, `diffusers` and `cli` import it."""
