"""The sampling run: `model` (the one model and filters opener), `job`, `setup` (flags -> job, each checked once), `loop`, `outputs`, `run`, `distributed`.

Imports everything below it (samplers, precondition, models, engines, evaluate); `bench` and `cli` import it."""
