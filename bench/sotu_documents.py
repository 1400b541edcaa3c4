"""Write the State of the Union corpus (../shared/assets/corpus-sotu-en) as a jsonl of
documents, one speech each (cut to --chars characters), for the job specs that run on it.

    python bench/sotu_documents.py [--out runs/sotu-docs.jsonl] [--documents 24] [--chars 6000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ASSET = Path(__file__).resolve().parents[2] / "shared" / "assets" / "corpus-sotu-en"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sotu-docs.jsonl")
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--chars", type=int, default=6000)
    args = parser.parse_args()
    text = (ASSET / "sotu.txt").read_text(encoding="utf-8")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for line in (ASSET / "sotu_index.jsonl").read_text().splitlines()[: args.documents]:
            entry = json.loads(line)
            speech = text[entry["char_offset"] : entry["char_offset"] + entry["char_len"]][: args.chars]
            f.write(json.dumps({"text": speech, "domain": str(entry["year"])}) + "\n")
    print(out)


if __name__ == "__main__":
    main()
