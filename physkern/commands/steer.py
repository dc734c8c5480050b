"""`physkern steer`: Jacobian steering toward a target token (physkern.research.analysis.steering)."""
from __future__ import annotations

import argparse

from ._common import ANALYSIS_OUT_DIR, check_output_file, int_in, positive_float


def register(sub) -> None:
    p = sub.add_parser("steer", help="Jacobian steering: minimal hidden-state change toward a "
                                     "target token, generation with and without it",
                       description="Find the smallest change of one hidden state (block --layer, "
                                   "last prompt position) that raises ln p(--target) by --gain "
                                   "nats, then generate greedily with and without it, and report "
                                   "the change's norm and the energy before and after.")
    p.add_argument("--model", default=None, help="model (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--target", required=True,
                   help="target token as text; must be exactly one token (mind leading spaces)")
    p.add_argument("--layer", type=int, default=None,
                   help="block whose output is changed, 0..L-1 or negative from the end "
                        "(default: the middle block)")
    p.add_argument("--gain", type=positive_float, default=2.0,
                   help="requested increase of ln p(target) in nats (default 2)")
    p.add_argument("--iterations", type=int_in(1), default=20,
                   help="iterations toward the exact gain (default 20; 1 = first order)")
    p.add_argument("--tol", type=positive_float, default=1e-3, help="tolerance on the gain (nats)")
    p.add_argument("--max-new-tokens", type=int_in(1), default=20, help="tokens to generate")
    p.add_argument("--json", default=f"{ANALYSIS_OUT_DIR}/steer.json",
                   help="result JSON (default ./physkern-analysis/steer.json; the committed "
                        "result was written with --json bench/results/analysis/steer.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..research.analysis._common import decoder_blocks
    from ..research.analysis.steering import steer
    from ..models import load_model, resolve_model_name
    from ..provenance import provenance, write_json
    if args.max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise ValueError("prompt must not be empty")
    check_output_file(args.json, "--json")
    model, tok = load_model(args.model, device=args.device)
    layer = len(decoder_blocks(model)) // 2 if args.layer is None else args.layer
    res = steer(model, tok, args.prompt, args.target, layer, args.gain, args.max_new_tokens,
                args.iterations, args.tol)
    print(f"layer {res['layer']}, position {res['position']}: |delta| = {res['norm']:.4f} "
          f"({100 * res['relative_norm']:.2f}% of |h| = {res['hidden_norm']:.2f}; first-order "
          f"{res['first_order_norm']:.4f}, gradient direction {res['gradient_direction_norm']:.4f}"
          f"; chosen: {res['method']})")
    print(f"p(target {args.target!r}): {res['target_prob_before']:.4g} -> "
          f"{res['target_prob_after']:.4g} (ln p +{res['achieved_gain']:.3f})")
    for name in ("plain", "steered"):
        e = res[f"energy_{name}"]
        print(f"{name:>8}: E at steered step {e['E_at_steered_step']:.3f} (K {e['K_at_steered_step']:.3f}"
              f", V {e['V_at_steered_step']:.3f}); continuation mean E {e['mean_E_continuation']:.3f}"
              f", CV {e['cv_E_continuation']:.3f}")
        print(f"          {args.prompt!r} + {res['text_' + name]!r}")
    write_json(args.json, {"analysis": "steer", "model": resolve_model_name(args.model), **res,
                           "provenance": provenance(args.device)})
    print(f"wrote {args.json}")
    return 0
