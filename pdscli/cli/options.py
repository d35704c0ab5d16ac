"""Option blocks shared by the commands, declared once: the same flag has the same name, type and
help in every command that takes it. Use as `checkpoint: options.Checkpoint = None`.

Numbers come in as the text typed: the object they go into (a ModelSpec, SampleFlags, BenchConfig)
checks each by its one rule (pdscli.flag_rules), so every refusal has one wording.

Conventions every command follows:
- `--json`: a flag. The command's result as one JSON document on stdout, and nothing else on
  stdout (progress and messages go to stderr or are off).
- `--out` / `-o`: where the command writes (a folder for sample/train, a file for filters, export
  and bench's report). Existing outputs are refused unless `--force` (or `--resume` where a run
  can be continued).
- `--engine-backend`: how an exported engine runs (cpu, cuda, tensorrt); `--backend` is its old
  spelling in `pds sample`, kept for one release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


MODEL, OUTPUT = "Model", "Output"

Checkpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint",
    help="score_sde / pds checkpoint (.pth, .safetensors), a diffusers model or pipeline folder, or hf:ORG/NAME\\[@REVISION] "
         "from the Hugging Face Hub.", rich_help_panel=MODEL)]
Config = Annotated[Optional[Path], typer.Option(
    "--config", help="Config of the checkpoint (.json / score_sde .py).", rich_help_panel=MODEL)]
Preset = Annotated[Optional[str], typer.Option(
    "--preset", help="Named config of an official checkpoint: {presets}.", rich_help_panel=MODEL)]
Engine = Annotated[Optional[Path], typer.Option(
    "--engine", help="Exported engine: .onnx, or a TensorRT .plan / .engine.", rich_help_panel=MODEL)]
EngineBackend = Annotated[Optional[str], typer.Option(
    "--engine-backend", "--backend",
    help="How --engine runs: {engine_backends} (auto, the default: the best the device has). --backend is the old name.",
    rich_help_panel=MODEL)]
TrustCheckpoint = Annotated[bool, typer.Option(
    "--trust-checkpoint", help="Allow a checkpoint that needs full pickle loading (runs code from the file).",
    rich_help_panel=MODEL)]
RandomWeights = Annotated[bool, typer.Option(
    "--random-weights", help="No checkpoint: the --preset / --config architecture with random weights.",
    rich_help_panel=MODEL)]
ImageSize = Annotated[Optional[str], typer.Option(
    "--image-size", metavar="N", help="Image side of an analytic model (default 32).", rich_help_panel=MODEL)]
Channels = Annotated[Optional[str], typer.Option(
    "--channels", metavar="N", help="Channels of an analytic model (default 3).", rich_help_panel=MODEL)]
Device = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel=MODEL)]
Tf32 = Annotated[str, typer.Option(
    "--tf32",
    help="TF32 tensor cores for float32 convolutions and matmuls on a GPU: off (IEEE float32, the default), on, "
         "or torch (torch's own default: convolutions only). Recorded in run.json and bench reports.",
    rich_help_panel=MODEL)]
Threads = Annotated[Optional[str], typer.Option(
    "--threads", metavar="N",
    help="CPU threads for torch (default: torch's, one per core). On a busy machine 1 is often much faster for small models.",
    rich_help_panel=MODEL)]

Force = Annotated[bool, typer.Option(
    "--force", help="Replace existing outputs.", rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars.", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option(
    "--json", help="Print the result as one JSON document on stdout (for scripts); nothing else goes to stdout.",
    rich_help_panel=OUTPUT)]
