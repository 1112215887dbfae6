"""Shapes-world VQA answers broken down by question kind and by the number of objects in the scene.

    python benchmarks/vqa_breakdown.py --answers answers.jsonl --questions SHAPES/vqa_test.jsonl \
        --scenes SHAPES/test.jsonl

`--answers`: the output of `tools/vqa.py --manifest/--shards` (one line per question, in the order
of `--questions`, with `answer` = the model's). `--questions`: the VQA manifest (`answer`, `qtype`,
`image`). `--scenes`: the shapes manifest the questions were made from (its `attrs` list the
objects). Prints exact match per (kind, objects) and, for wrong "where" answers, how many name
the cell of another object in the scene (the model found an object, but not the one asked about)
and how many name the first object in raster order (a positional habit rather than the question).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def breakdown(answers: list[dict[str, Any]], questions: list[dict[str, Any]],
              scenes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"by_kind_objects": {(kind, k): [right, n]}, "by_objects": ..., "where_wrong": {...}}."""
    if len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions: not the same run")
    by_kind: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    by_objects: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    where = {"wrong": 0, "names_another_object": 0, "names_raster_first": 0}
    for a, q in zip(answers, questions):
        scene = scenes.get(Path(q["image"]).name)
        if scene is None:
            raise KeyError(f"{q['image']}: not in the scenes manifest")
        objs = scene["attrs"]["objects"]
        right = a["answer"] == q["answer"]
        for key, table in (((q["qtype"], len(objs)), by_kind), (len(objs), by_objects)):
            table[key][0] += right
            table[key][1] += 1
        if q["qtype"] == "where" and not right:
            where["wrong"] += 1
            where["names_another_object"] += a["answer"] in {o["position"] for o in objs}
            first = min(objs, key=lambda o: (o["cell"][0], o["cell"][1]))
            where["names_raster_first"] += a["answer"] == first["position"]
    return {"by_kind_objects": dict(by_kind), "by_objects": dict(by_objects), "where_wrong": where}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", required=True)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--scenes", required=True)
    args = parser.parse_args()
    scenes = {Path(s["image"]).name: s for s in read_jsonl(args.scenes)}
    out = breakdown(read_jsonl(args.answers), read_jsonl(args.questions), scenes)
    pct = lambda r: f"{100 * r[0] / r[1]:5.1f} % ({r[0]}/{r[1]})"
    print("| kind | " + " | ".join(f"{k} object(s)" for k in sorted(out["by_objects"])) + " |")
    print("|---|" + "---|" * len(out["by_objects"]))
    for kind in sorted({k for k, _ in out["by_kind_objects"]}):
        cells = [pct(out["by_kind_objects"][(kind, n)]) if (kind, n) in out["by_kind_objects"] else "-"
                 for n in sorted(out["by_objects"])]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(pct(out["by_objects"][n]) for n in sorted(out["by_objects"])) + " |")
    print(json.dumps({"where_wrong": out["where_wrong"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
