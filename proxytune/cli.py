"""Command line: ``proxytune demo``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    import proxytune
    from proxytune import backends

    # A toy next-token step: the base model would answer tersely; the expert (a tuned small model) prefers
    # a polite answer, its untuned anti-expert does not. Proxy-tuning adds the expert's *difference*.
    words = ["Sure", "No", "The", "Certainly", "Maybe", "I", "Please", "Thanks"]
    base = torch.tensor([[1.0, 2.0, 2.5, 0.0, 1.5, 1.0, -0.5, -1.0]])
    expert = torch.tensor([[3.0, 0.5, 1.0, 3.5, 0.0, 1.5, 2.0, 1.0]])
    anti = torch.tensor([[1.0, 1.5, 2.0, 0.0, 1.0, 1.0, -0.5, -1.0]])

    s = proxytune.combine(base, [expert], [anti], weights=args.alpha)
    p_base = torch.softmax(base / args.temperature, dim=1)[0]
    p_proxy = torch.softmax(s / args.temperature, dim=1)[0]
    n = args.draws
    row = lambda x: x.expand(n, -1)  # noqa: E731  the same step for n independent rows (seeds 0..n-1)
    tokens = proxytune.sample(
        row(base), [row(expert)], [row(anti)], weights=args.alpha, temperature=args.temperature,
        top_p=args.top_p, seed=torch.arange(n), step=0,
    )  # fmt: skip
    freq = torch.bincount(tokens, minlength=len(words)).double() / n

    backend = backends.resolve("auto", base.device).name
    print(f"proxytune {proxytune.__version__}: s = base + {args.alpha} * (expert - anti), "
          f"temperature {args.temperature}, top_p {args.top_p}, backend '{backend}'\n")
    print(f"{'token':<10} {'p(base)':>8} {'p(proxy)':>9} {'sampled':>8}")
    for j, w in enumerate(words):
        print(f"{w:<10} {p_base[j]:8.3f} {p_proxy[j]:9.3f} {freq[j]:8.3f}")
    print(f"\n'sampled' is the share of {n} draws (seeds 0..{n - 1}) after top-p {args.top_p}: tokens outside "
          "the nucleus never appear, the rest follow p(proxy) renormalised over the nucleus.")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="proxytune", description="Fast decoding-time proxy-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show the proxy-tuning op on a toy next-token step")
    demo.add_argument("--alpha", type=float, default=1.0, help="weight of (expert - anti-expert)")
    demo.add_argument("--temperature", type=float, default=1.0)
    demo.add_argument("--top-p", type=float, default=0.9)
    demo.add_argument("--draws", type=int, default=20000)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as e:
        print(f"proxytune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
