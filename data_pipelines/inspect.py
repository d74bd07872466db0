"""Checks webdataset shards: counts samples, reports bad ones by reason (with shard and key), shows a few.

    python -m data_pipelines.inspect SHARDS... [--show 3] [--no-decode] [--workers N] [--json]

SHARDS are shard specs as training takes them (brace ranges, globs, URLs, .txt lists). Every image is decoded
unless --no-decode, so corrupt images are found before a run skips them. Exit status 1 if any sample is bad.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections import Counter

from data_pipelines.ops import decode_image
from data_pipelines.samples import SampleError
from data_pipelines.webdataset import expand_shards, read_shard

_EXAMPLES_PER_SHARD = 5  # bad samples listed per shard


def inspect_shard(job: tuple[str, bool, int]) -> dict:
    """Counts and examples for one shard: samples, bad samples by reason, a few shown samples."""
    url, decode, show = job
    counts, bad, shown = Counter(), [], []
    for record in read_shard(url):
        if "__skipped__" in record:
            counts.update(record["__skipped__"])
            bad.append({"where": record["__where__"], "reason": next(iter(record["__skipped__"]))})
            continue
        if decode:
            try:
                height, width = decode_image(record["image"]).shape[:2]
            except SampleError as e:
                counts[e.reason] += 1
                bad.append({"where": f"key {record['__key__']}", "reason": e.reason})
                continue
            record["size"] = f"{width}x{height}"
        counts["samples"] += 1
        if len(shown) < show:
            shown.append({"key": record["__key__"], "caption": record.get("caption", ""),
                          "image_bytes": len(record["image"]), **({"size": record["size"]} if decode else {})})
    return {"shard": url, "counts": dict(counts), "bad": bad[:_EXAMPLES_PER_SHARD], "shown": shown}


def inspect(specs: list[str], decode: bool = True, show: int = 3, workers: int = 1) -> dict:
    """Per-shard reports (in shard order) and totals over every shard of `specs`."""
    shards = [url for spec in specs for url in expand_shards(spec)]
    jobs = [(url, decode, show if i == 0 else 0) for i, url in enumerate(shards)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            reports = pool.map(inspect_shard, jobs)
    else:
        reports = [inspect_shard(job) for job in jobs]
    totals = sum((Counter(report["counts"]) for report in reports), Counter())
    return {"shards": len(reports), "totals": dict(totals), "reports": reports}


def print_report(result: dict) -> None:
    for report in result["reports"]:
        counts = report["counts"]
        bad = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()) if reason != "samples")
        print(f"{report['shard']}: {counts.get('samples', 0)} samples" + (f"; bad: {bad}" if bad else ""))
        for example in report["bad"]:
            print(f"    {example['reason']}: {example['where']}")
        for sample in report["shown"]:
            print(f"    sample {json.dumps(sample)}")
    totals = result["totals"]
    bad_total = sum(n for reason, n in totals.items() if reason != "samples")
    print(f"{result['shards']} shards, {totals.get('samples', 0)} good samples, {bad_total} bad"
          + (f" ({', '.join(f'{r} {n}' for r, n in sorted(totals.items()) if r != 'samples')})"
             if bad_total else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--show", type=int, default=3, help="samples of the first shard to print")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding images (faster)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = inspect(args.shards, decode=not args.no_decode, show=args.show, workers=args.workers)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result)) if args.json else print_report(result)
    return int(any(reason != "samples" for reason in result["totals"]))


if __name__ == "__main__":
    sys.exit(main())
