"""Memory probe: ``python -m torchderiv.bench._memprobe '{"scenario": ..., "method": ...}'``.

Runs one method of one scenario in this fresh process and prints ``{"peak_bytes": ..., "how": ...}``:
the peak resident memory of one (warmed-up) call above the resident memory before it.
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    from ._runner import _ctx, _to_device
    from ._scenarios import SCENARIOS, model_scenario
    from ._timing import cpu_peak_rss

    if "model" in spec:
        sc = model_scenario(spec["model"], spec["op"], spec.get("batch"))
    else:
        sc = SCENARIOS[spec["scenario"]]
    m = next(m for m in sc.methods if m.name == spec["method"])
    setup = _to_device(sc.make(), torch.device("cpu"))
    with _ctx(sc.no_grad):
        run = m.build(setup)
        if not (m.slow or m.quick_once):
            run()  # warm-up: tracing and caches are one-time costs
        pm = cpu_peak_rss(run)
    print(json.dumps({"peak_bytes": pm.peak_bytes, "how": pm.how}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
