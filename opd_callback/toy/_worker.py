"""Worker entry point: ``python -m opd_callback.toy._worker '<json args>'`` (used by ``toy.build.train_all``)."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = json.loads(sys.argv[1])
    from opd_callback.toy.build import train_and_save

    result = train_and_save(args["names"], args["out_dir"], args["seed"], args["verbose"], args.get("threads", 1))
    tmp = args["result_path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args["result_path"])


if __name__ == "__main__":
    main()
