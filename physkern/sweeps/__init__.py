"""Sweeps behind `physkern sweep KIND`, one module each, as plain functions (no argparse: the
command line of every kind is physkern/commands/sweep.py)."""
