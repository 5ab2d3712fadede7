"""Command line of `validation` (placeholder until its issue lands)."""

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="validation")
    parser.parse_args(argv)
    return 0
