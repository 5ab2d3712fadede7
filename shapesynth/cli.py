"""Command line of `shapesynth` (placeholder until its issue lands)."""

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="shapesynth")
    parser.parse_args(argv)
    return 0
