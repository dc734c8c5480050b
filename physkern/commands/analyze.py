"""`physkern analyze <name>`: the physics analyses.

Each analysis lives in physkern/research/analysis/<module>.py and exposes `register_analysis(subparsers)`,
which adds its own sub-parser (with `set_defaults(func=...)`). This file only discovers them, so
adding an analysis never means editing a central list.
"""
from __future__ import annotations

import importlib
import pkgutil


def _analysis_modules():
    from ..research import analysis
    for info in sorted(pkgutil.iter_modules(analysis.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{analysis.__name__}.{info.name}")
        if hasattr(module, "register_analysis"):
            yield module


def register(sub) -> None:
    p = sub.add_parser("analyze", help="physics-inspired analyses of a model (rg, spectra, ...)",
                       description="Run one analysis on a model; each writes a JSON (with "
                                   "provenance) and PNG plots, by default into "
                                   "./physkern-analysis/ (--out-dir to choose; the committed "
                                   "results used --out-dir bench/results/analysis).")
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    for module in _analysis_modules():
        module.register_analysis(analyses)

    def _no_analysis(args) -> int:
        names = ", ".join(sorted(analyses.choices)) or "none installed"
        raise ValueError(f"analyze: name an analysis ({names})")

    p.set_defaults(func=_no_analysis)
