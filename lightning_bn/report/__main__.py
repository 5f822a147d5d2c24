"""``python -m lightning_bn.report RUNS_DIR [--out DIR]``: figures and tables of every experiment.

Reads the TensorBoard event files (and the sweeps' run.json) under RUNS_DIR and writes
``report.md`` with one section per experiment plus its PNG figures, by default into
RUNS_DIR/report/. See docs/experiments.md.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from lightning_bn.errors import ArgumentParser, ConfigError
from lightning_bn.report.build import build_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m lightning_bn.report",
        description="Figures (PNG) and a markdown summary of the runs under RUNS_DIR.",
    )
    parser.add_argument("runs_dir", help="directory holding the runs, e.g. runs/ (searched recursively)")
    parser.add_argument("--out", help="output directory (default: RUNS_DIR/report)")
    args = parser.parse_args(argv)
    command = shlex.join(
        ["python", "-m", "lightning_bn.report", args.runs_dir, *(["--out", args.out] if args.out else [])]
    )
    try:
        report = build_report(args.runs_dir, args.out, command=command)
    except (FileNotFoundError, ConfigError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except OSError as err:  # e.g. --out inside a file, or not writable; the old report is untouched
        sys.stderr.write(f"error: --out {args.out or args.runs_dir + '/report'}: cannot write the report ({err})\n")
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
