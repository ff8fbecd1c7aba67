"""How much of real text a drafter vocabulary of the first N token ids could draft (docs/gguf.md: why drafter.gguf
cannot drop the tail of its token table): the share of the bench suites' prompt tokens with id < N, Gemma 3's
tokenizer.

    python bench/vocab_prefix_coverage.py
"""

from __future__ import annotations

import numpy as np

from mtpkit.model.load import load_target
from mtpkit.suites import load_suite

SIZES = (8192, 16384, 32768, 65536, 131072)


def main() -> None:
    tok = load_target("gemma3-270m").tokenizer
    for s in ("humaneval", "mtbench", "everyday"):
        ids = np.concatenate([np.array(tok.encode(p.text)) for p in load_suite(s)])
        print(s, f"{len(ids)} tokens", {n: round(float((ids < n).mean()), 3) for n in SIZES})


if __name__ == "__main__":
    main()
