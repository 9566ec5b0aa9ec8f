"""Write the counting world's prompt files: every (count, colour, shape) combination in both number forms (`3 red
squares`, `three red squares`); the combinations with (count + colour index + shape index) % 3 == 0 are held out, so
every count, colour and shape (and every pair of them) is trained on, but no held-out combination is.

    python tools/counting_prompts.py --out configs/words
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tdm_r1.worlds.counting import COLOURS, MAX_COUNT, SHAPES, phrase


def split_prompts() -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for count in range(1, MAX_COUNT + 1):
        for ci, colour in enumerate(COLOURS):
            for si, shape in enumerate(SHAPES):
                dest = heldout if (count + ci + si) % 3 == 0 else train
                dest += [phrase(count, colour, shape), phrase(count, colour, shape, words=True)]
    return train, heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="configs/words", help="folder for counting_train.txt and counting_heldout.txt")
    out = Path(ap.parse_args().out)
    train, heldout = split_prompts()
    (out / "counting_train.txt").write_text("\n".join(train) + "\n")
    (out / "counting_heldout.txt").write_text("\n".join(heldout) + "\n")
    print(f"{len(train)} train prompts, {len(heldout)} held-out prompts in {out}")


if __name__ == "__main__":
    main()
