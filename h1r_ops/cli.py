"""The ``h1r`` command line: ``h1r info``, ``h1r demo``, ``h1r generate``, ``h1r deepconf``, ``h1r train sft|grpo``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(argv) -> int:
    import h1r_ops

    print(json.dumps(h1r_ops.backends(), indent=2))
    return 0


def _demo(argv) -> int:
    from h1r_ops import demo

    return demo.main(argv)


def _generate(argv) -> int:
    from h1r_ops.infer.cli import generate_main

    return generate_main(argv)


def _deepconf(argv) -> int:
    from h1r_ops.infer.cli import deepconf_main

    return deepconf_main(argv)


def _train(argv) -> int:
    from h1r_ops.train import cli

    return cli.main(argv)


COMMANDS = {
    "info": (_info, "backends and kernels of this build"),
    "demo": (_demo, "every op vs its reference, timed"),
    "generate": (_generate, "sample traces with the paged engine"),
    "deepconf": (_deepconf, "DeepConf voting (online / offline) over parallel traces"),
    "train": (_train, "SFT / GRPO of a tiny Falcon-H1 on the demo math task (h1r train sft|grpo)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="h1r", description="h1r: kernels, model, decoder and trainer for Falcon-H1R")
    ap.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    args, rest = ap.parse_known_args(argv[:1])
    return COMMANDS[args.command][0](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
