"""Sweep kinds for `physkern sweep KIND`: one module each, each with `register_sweep(subparsers)`."""
