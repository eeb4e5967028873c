"""Are ``oracle_scene``'s picks the daemon's with ``judge.reviews_per_session = 1``? (session 33)

    PYTHONPATH=. python docs/simulate/propagate/daemon_rule.py RUN [OUT.json]

``oracle_scene`` walks the judge's ranking taking one frame per recording: the pool's scene tag
*replaces* the judge's dHash near-duplicate test. The daemon with ``judge.reviews_per_session = 1``
keeps its dHash test (``near_duplicate``: a frame within 6 bits of a same-camera image sent to review
waits) *and* caps each declared recording at one review. Both walk the same ranking with the
same camera cap, so the daemon's rule takes exactly ``oracle_scene``'s picks unless one of those
picks is a dHash near-duplicate of an earlier pick of its round or of an image reviewed before
(the combined test rejects everything the scene test rejects). This reads every ``oracle_scene``
unit of RUN (its ordered picks in ``state.json``, the scoring bundle's dHashes in
``pool_scores.json``) and counts such picks: none means the measured units are the daemon's rule.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from exporter.simulate_select import near_duplicate, pool_score


def check(out: Path) -> dict:
    rep: dict = {}
    for seed_dir in sorted((out / "runs").glob("seed*")):
        for unit in sorted((seed_dir / "oracle_scene").glob("round[0-9]")):
            r = int(unit.name[len("round"):])
            prev = seed_dir / ("initial" if r == 1 else f"oracle_scene/round{r - 1}")
            scores = {d["file_name"]: pool_score(d) for d in json.loads((prev / "pool_scores.json").read_text())["scores"]}
            state = json.loads((unit / "state.json").read_text())
            picks = state["selected"]
            chosen = set(picks)
            seen = [n for n in state["labelled"] if n not in chosen]  # reviewed before this round
            clashes = []
            for i, p in enumerate(picks):
                q = next((q for q in (*seen, *picks[:i]) if near_duplicate(scores[p], scores[q])), None)
                if q is not None:
                    clashes.append([p, q])
            rep[f"{seed_dir.name} round{r}"] = {"picks": len(picks), "earlier": len(seen), "dhash_clashes": clashes}
            print(f"{seed_dir.name} round {r}: {len(picks)} picks, {len(seen)} reviewed before; "
                  f"picks the daemon's dHash test would hold back: {len(clashes)}")
    return rep


if __name__ == "__main__":
    result = check(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(result, indent=1))
