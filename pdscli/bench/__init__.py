"""`pds bench`: config (flags, checks), timing, model, backends, export_cache, latency (part nfe),
preconditioner, overhead, quality, fid (--fid-ref), runs (parts e2e and samplers), report (the one report model),
render (Rich and Markdown), plot; run.run_bench puts them together.

Imports the packages below it (sample, samplers, precondition, models, engines, evaluate, train: tests/test_layout.py's
table); only `cli` and scripts import it."""
