"""`fractal SUBCOMMAND ...`: dispatches to each subcommand's own `main(argv)`.

Subcommands are imported only when run, so `fractal serve` never imports torch and
`fractal --help` works on a serving host without the training extra.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("model.train", "train FractalNet (torchrun-aware)"),
    "export": ("model.export", "export a checkpoint as a per-column ONNX bundle"),
    "average": ("model.average", "average the weights of several checkpoints (SWA)"),
    "eval": ("model.evaluate", "top-1 accuracy of a checkpoint (torch) or bundle (onnxruntime)"),
    "bench-train": ("model.bench", "training images/s: drop-path skipped, off, and masked"),
    "serve": ("service.cli", "run the anytime inference server"),
    "classify": ("service.client", "send one image to a server and print the answer(s)"),
    "bench": ("loadtest.bench", "serving benchmark: in-process floor vs the live server"),
    "loadtest": ("loadtest.cli", "open-loop load test: deadline hit rate and accuracy"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: fractal COMMAND [ARGS...]",
        "",
        "Anytime inference for FractalNet. Commands:",
        *(f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "Run `fractal COMMAND --help` for a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"fractal: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        extra = {"model": "train", "loadtest": "loadtest"}.get(module_name.split(".")[0], "cpu")
        print(
            f"fractal {name}: missing dependency {exc.name!r}; install the "
            f"'{extra}' extra (pip install -e '.[{extra}]')",
            file=sys.stderr,
        )
        return 1
    result = module.main(rest)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
