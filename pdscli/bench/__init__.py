"""`pds bench`: config (flags, checks), timing, model, backends, export_cache, latency (part nfe),
preconditioner, overhead, quality, runs (parts e2e and samplers), report (the one report model),
render (Rich and Markdown), plot; run.run_bench puts them together.

Imports everything below it (sample, samplers, models, engines, evaluate); only `cli` and scripts import it."""
