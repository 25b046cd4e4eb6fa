"""Run one benchmark or all of them: ``python -m bench all`` or ``python -m bench <name> [options]``.

``all`` runs every benchmark with its default sizes (about 90 s on the
2-core machine of BENCHMARKS.md). Each benchmark's own options scale it up, for example
``python -m bench end_to_end --connections 1000000``; ``python -m bench <name>
--help`` lists them. The same commands work as ``python -m bench.<name>``.
"""

import argparse
import dataclasses
import json
import sys
import time
import traceback

from bench import common, drain, end_to_end, increments, memory, teardown

BENCHMARKS = {
    "teardown": teardown,
    "increments": increments,
    "end_to_end": end_to_end,
    "drain": drain,
    "memory": memory,
}


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{all," + ",".join(BENCHMARKS) + "}")
    run_all = commands.add_parser("all", help="run every benchmark with its default sizes")
    common.add_common_arguments(run_all)
    run_all.add_argument("--json", help="also write the results and the machine facts to this JSON file")
    for name, module in BENCHMARKS.items():
        command = commands.add_parser(name, help=module.__doc__.splitlines()[0])
        common.add_common_arguments(command)
        command.add_argument("--json", help="also write the results and the machine facts to this JSON file")
        module.add_arguments(command)
    return parser


def defaults_for(module, args):
    """Return ``args`` completed with the module's own defaults, for ``all``."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    completed = parser.parse_args([])
    for key, value in vars(args).items():
        setattr(completed, key, value)
    return completed


def run_benchmarks(args):
    """Run the benchmarks the command names; return (results, failures). A failure does not stop the others."""
    results = []
    failures = []
    names = list(BENCHMARKS) if args.command == "all" else [args.command]
    for name in names:
        module = BENCHMARKS[name]
        module_args = defaults_for(module, args) if args.command == "all" else args
        try:
            results.extend(module.run(module_args))
        except Exception as error:  # noqa: BLE001 - report the failure and go on with the next benchmark
            failures.append(f"{name}: {type(error).__name__}: {error}")
            print(f"\n{name} failed:", file=sys.stderr)
            traceback.print_exc()
    return results, failures


def write_json(path, results, failures, elapsed):
    with open(path, "w") as output:
        json.dump(
            {
                "machine": common.machine_summary(),
                "command": " ".join(sys.argv),
                "seconds": round(elapsed, 1),
                "results": [dataclasses.asdict(result) for result in results],
                "failures": failures,
            },
            output,
            indent=2,
        )


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.prepare(args)
    common.print_machine()

    started = time.monotonic()
    try:
        results, failures = run_benchmarks(args)
    finally:
        common.remove_data_dir()
    elapsed = time.monotonic() - started

    common.print_results(results, title=f"Results ({elapsed:.0f} s)")
    if failures:
        print("\nBenchmarks that failed:\n  " + "\n  ".join(failures))
    if args.json:
        write_json(args.json, results, failures, elapsed)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
