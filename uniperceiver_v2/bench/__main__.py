"""`python -m uniperceiver_v2.bench <name> [options]`: run the benchmark module `<name>`."""

from __future__ import annotations

import sys

from uniperceiver_v2.bench import available_benchmarks, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m uniperceiver_v2.bench <name> [options]   (<name> --help for its options)")
        print(f"benchmarks: {', '.join(available_benchmarks())}")
        return 0 if argv else 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
