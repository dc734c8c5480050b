"""`physkern sweep KIND ...`: parameter sweeps. Each kind lives in physkern/sweeps/<kind>.py and
exposes `register_sweep(subparsers)`; this file only discovers them (no central list to edit)."""
from __future__ import annotations

import importlib
import pkgutil

from .. import sweeps


def register(sub) -> None:
    p = sub.add_parser("sweep", help="sweep a parameter and record perplexity / work per point",
                       description="Sweeps; each kind writes a JSON (with provenance) and a plot.")
    kinds = p.add_subparsers(dest="sweep_kind", metavar="KIND")
    for info in sorted(pkgutil.iter_modules(sweeps.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{sweeps.__name__}.{info.name}")
        module.register_sweep(kinds)

    def no_kind(args) -> int:
        p.print_help()
        return 2
    p.set_defaults(func=no_kind)
