"""Command line of `trainers` (placeholder until its issue lands)."""

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trainers")
    parser.parse_args(argv)
    return 0
