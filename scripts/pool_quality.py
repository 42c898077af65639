"""Pool several ``bench quality`` runs question by question: one paired comparison over all their questions.

Runs on different seeds ask different questions, so together they measure a codec with more power
than any one of them (shadowserve/bench/common/quality_pool.py says how they are joined).

    python scripts/pool_quality.py docs/quality-a.json docs/quality-b.json --name balanced

The first run that measured ``--name`` fixes which KV it means; in the other runs the name counts only
where it decodes to that KV, and a level or preset under another name that does is taken instead (so
a preset measured in one run pools with the level it became in another).
"""

from __future__ import annotations

import argparse
import json
import sys

from shadowserve.bench.common.quality_pool import pool_runs
from shadowserve.errors import ConfigError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="bench quality --json files")
    p.add_argument("--name", required=True, help="the level or codec to pool (as named in the runs)")
    p.add_argument("--json", help="write the pooled comparison here")
    args = p.parse_args()
    reports = []
    for path in args.runs:
        with open(path) as f:
            reports.append(json.load(f))
    try:
        row = pool_runs(reports, args.name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{row['name']} ({row['kv_format']}) over {row['questions']} questions, {row['documents']} documents, "
          f"{row['runs']} runs: recompute {100 * row['recompute_accuracy']:.1f}%, {row['name']} "
          f"{100 * row['accuracy']:.1f}%, delta {row['delta_points']:+.2f} points "
          f"[{row['delta_ci'][0]:+.2f}, {row['delta_ci'][1]:+.2f}], lost {row['lost']} / gained {row['gained']}, "
          f"McNemar p {row['mcnemar_p']:.3g}")
    for task, d in row.get("per_task_delta", {}).items():
        print(f"  {task}: delta {d['delta_points']:+.2f} points [{d['delta_ci'][0]:+.2f}, {d['delta_ci'][1]:+.2f}], "
              f"lost {d['lost']} / gained {d['gained']}, McNemar p {d['mcnemar_p']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
