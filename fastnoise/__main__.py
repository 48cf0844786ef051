"""``python -m fastnoise {check,bench}``."""

import sys

USAGE = """usage: python -m fastnoise {check,bench} [options]

  check   validate every backend available here against the reference (exit 1 on failure)
  bench   time fastnoise's backends against the peers (plain F.embedding, the Hugging Face
          NEFTune hook, torch.compile of it, the torch-ops SymNoise pair, the NoisyTune loop)

Run `python -m fastnoise COMMAND --help` for the options of each."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        from .check import main as run
    elif command == "bench":
        from .bench import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
