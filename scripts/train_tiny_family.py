#!/usr/bin/env python3
"""Train the shipped tiny model family; same as ``python -m proxytune.tinyworld.train`` (see ``--help``)."""

from proxytune.tinyworld.train import main

if __name__ == "__main__":
    raise SystemExit(main())
