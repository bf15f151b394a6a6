"""``python -m opd_callback.toy [--seed N] [--rebuild] [--threads T] [--cache-dir DIR]``: load or build a lab.

Without ``--rebuild`` the shipped lab (seed 0) is loaded, or a cached one; ``--rebuild`` trains the lab of ``--seed``
into the cache (about 2-5 minutes on 2 CPU cores) and prints its accuracies.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    p = argparse.ArgumentParser(prog="python -m opd_callback.toy", description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="default: $OPD_TOY_CACHE or ~/.cache/opd_callback/toy")
    p.add_argument("--rebuild", "--force", dest="force", action="store_true",
                   help="train the lab (into the cache) even if it is shipped or cached")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per training process (default 1)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from . import build_lab

    t0 = time.perf_counter()
    lab = build_lab(cache_dir=args.cache_dir, seed=args.seed, force=args.force, verbose=not args.quiet,
                    threads=args.threads)
    dt = time.perf_counter() - t0
    print(f"lab: {lab.path}")
    print(lab.accuracy_table())
    meta = lab.meta
    for name, info in meta.get("models", {}).items():
        print(f"  {name}: {info.get('params')} params, steps {info.get('steps')}, {info.get('seconds')}s (incl. eval)")
    print(f"build (training + evaluation, when built): {meta.get('build_seconds')}s with {meta.get('workers')} "
          f"worker(s), {meta.get('threads', 1)} thread(s) each, on {meta.get('cpu', 'an unrecorded CPU')}")
    print(f"this call took {dt:.1f}s")


if __name__ == "__main__":
    main()
