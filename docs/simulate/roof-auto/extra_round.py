"""Control (session 22): one more round on the same reviewed set (no new reviews) after round 1,
per strategy and seed: does the second round's gain come from its 40 new labels or from 3 more
epochs? Usage: python docs/simulate/roof-auto/extra_round.py RUN_FOLDER judge,random [ROUND [REPEATS]]
(units go to RUN_FOLDER/runs/seedS/STRATEGY/round1_again/metrics.json; REPEATS > 1 (session 26)
trains each again with the run's other training seeds, as ``--repeats``, into repeat1, ... there
and prints the mean; a resumed call trains only what is missing). Since session 37 this is
``docs/simulate/repeats.py RUN_FOLDER REPEATS STRATEGY/roundR_again ...``, which trains any unit's
repeats."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import repeats  # noqa: E402  (docs/simulate/repeats.py)


def main(out: Path, strategies: list[str], rnd: int = 1, n: int = 1) -> None:
    repeats.main(out, n, [f"{s}/round{rnd}_again" for s in strategies])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(Path(sys.argv[1]), sys.argv[2].split(","), *(int(a) for a in sys.argv[3:5]))
