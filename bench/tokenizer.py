"""Benchmark the BPE trainer (jaxchat.rustbpe) against HF tokenizers and nanochat's rustbpe.

    python bench/tokenizer.py [--vocab-sizes 8192,65536] [--corpus-mb 50] [--skip-peers]

Builds (once, then cached) a corpus of English-ish text found on this machine: Debian docs and
licences, man pages, Markdown/reST/text files, then Python sources if more is needed. Each
trainer runs in its own subprocess, so wall time and peak RSS are its own. Also measures tiktoken
encoding throughput with our ranks. Prints a table; it is a benchmark, not a test.

nanochat's rustbpe comes from PyPI into a separate venv (never the project's); if that fails the
bench says why and goes on without it.
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# nanochat's split pattern (same as jaxchat.rustbpe.GPT4_PATTERN; repeated so that the worker
# for nanochat's rustbpe, which runs in another venv, needs nothing from this project).
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
DOC_CAP = 10_000  # characters per document, like nanochat's tok_train --doc_cap
MAX_DOCS_PER_FILE = 30  # so that no single huge file (a 2 MB copyright list...) dominates
SKIP = re.compile(r"\.(ps|pdf|svg|html?|js|css|xml|json|png|gif|jpe?g|py[co])(\.gz)?$")  # markup, binaries
SEP = "\x00"  # document separator in the cached corpus file (documents never contain NUL)


def cache_dir() -> Path:
    base = os.environ.get("JAXCHAT_BASE_DIR")
    d = Path(base) / "bench" if base else Path.home() / ".cache" / "jaxchat" / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------------------------
# Corpus


def _strip_troff(text: str) -> str:
    """Keep the prose of a man page: drop requests and comments, keep macro text, drop escapes."""
    out = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"")):  # comments
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro in {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "TP", "IP", "Nm", "Nd", "Ar", "Fl"}:
                line = rest.replace('"', "")
            else:
                continue
        line = re.sub(r"\\f(\(..|\[[^\]]*\]|.)|\\\*(\(..|\[[^\]]*\]|.)|\\s[-+]?\d", "", line)
        line = line.replace("\\-", "-").replace("\\(aq", "'").replace("\\(em", "--").replace("\\e", "\\").replace("\\&", "")
        line = re.sub(r"\\\(..", "", line)
        if line.strip():
            out.append(line)
    return "\n".join(out)


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    if SEP in text:
        return None  # binary
    return text


def _sources():
    """(kind, paths) in priority order: prose first, code last. Paths sorted for determinism."""

    def walk(roots, suffixes=None, exclude=()):
        paths = []
        for root in roots:
            root = Path(root)
            if root.is_dir():
                for p in root.rglob("*"):
                    if (p.is_file() and (suffixes is None or p.name.endswith(suffixes)) and not SKIP.search(p.name)
                            and not any(x in str(p) for x in exclude)):
                        paths.append(p)
        return sorted(set(paths))

    home = Path.home()
    yield "licences+debian-docs", walk(["/usr/share/common-licenses", "/usr/share/doc"])
    yield "man-pages", sorted(p for p in Path("/usr/share/man").glob("man*/*") if p.is_file())
    yield "md/rst/txt", walk(
        ["/usr/share", "/usr/lib", sys.prefix, sys.base_prefix, home / ".cargo/registry/src", home / ".rustup/toolchains"],
        (".md", ".rst", ".txt"),
        exclude=("/usr/share/doc", "/usr/share/man"),
    )
    yield "python-sources", walk([sys.base_prefix + "/lib", "/usr/lib/python3"], (".py",), exclude=("site-packages",))


def build_corpus(target_mb: int) -> Path:
    path = cache_dir() / f"tokenizer_corpus_{target_mb}mb.txt"
    if path.exists():
        return path
    target = target_mb * 1_000_000
    docs, seen, size, kinds = [], set(), 0, {}
    sources = list(_sources())
    t0 = time.time()
    for i, (kind, paths) in enumerate(sources):
        # Share what is left evenly among the prose sources still to come; code only fills up.
        n_prose_left = max(len(sources) - 1 - i, 1)
        budget = size + (target - size) / n_prose_left
        for p in paths:
            if size >= budget:
                break
            text = _read_text(p)
            if text and kind == "man-pages":
                text = _strip_troff(text)
            if not text or len(text) < 200:
                continue
            for j in range(0, min(len(text), DOC_CAP * MAX_DOCS_PER_FILE), DOC_CAP):
                doc = text[j : j + DOC_CAP]
                h = hashlib.sha1(doc.encode()).digest()
                if h in seen:  # the same licence text sits in hundreds of copyright files
                    continue
                seen.add(h)
                docs.append(doc)
                n = len(doc.encode())
                size += n
                kinds[kind] = kinds.get(kind, 0) + n
    tmp = path.with_suffix(".tmp")
    tmp.write_text(SEP.join(docs), encoding="utf-8")
    tmp.rename(path)
    path.with_suffix(".json").write_text(json.dumps({k: round(v / 1e6, 1) for k, v in kinds.items()}))
    print(f"built corpus in {time.time() - t0:.1f}s", flush=True)
    if size < target:
        print(f"warning: found only {size / 1e6:.1f} MB of text, not {target_mb} MB", flush=True)
    return path


def load_docs(path) -> list[str]:
    """Reads the corpus in blocks, so that loading peaks well below training in RSS."""
    docs, tail = [], b""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            parts = (tail + block).split(SEP.encode())
            tail = parts.pop()
            docs.extend(part.decode("utf-8") for part in parts)
    docs.append(tail.decode("utf-8"))
    return docs


# ----------------------------------------------------------------------------------------------
# Workers: each runs in a subprocess and prints one JSON line.


def ranks_path(corpus, vocab: int, kind: str) -> Path:
    return Path(f"{corpus}.ranks{vocab}.{kind}.json")


def save_ranks(ranks, corpus, vocab: int, kind: str):
    """Keeps a trainer's ranks, to compare trainers and to benchmark encoding."""
    ranks_path(corpus, vocab, kind).write_text(json.dumps([[bytes(b).hex(), r] for b, r in ranks]))


def load_ranks(corpus, vocab: int, kind: str) -> list | None:
    path = ranks_path(corpus, vocab, kind)
    return [(bytes.fromhex(h), r) for h, r in json.loads(path.read_text())] if path.exists() else None


def worker(kind: str, vocab: int, corpus: str, docs: list[str]) -> dict:
    if kind == "ours":
        from jaxchat.rustbpe import Tokenizer

        tok = Tokenizer()
        t0 = time.perf_counter()
        tok.train_from_iterator(iter(docs), vocab, pattern=PATTERN)
        wall = time.perf_counter() - t0
        st = tok.last_train_stats()
        save_ranks(tok.get_mergeable_ranks(), corpus, vocab, kind)
        return {"train_s": wall, "ingest_s": st["iterator_s"] + st["split_count_s"], "merge_s": st["merge_s"],
                "vocab": len(tok.get_mergeable_ranks())}
    if kind == "nanochat":
        import logging

        import rustbpe

        # nanochat's rustbpe logs "Processed N sequences total" when ingestion ends: time it.
        marks = {}

        class Mark(logging.Handler):
            def emit(self, record):
                if record.getMessage().startswith("Processed"):
                    marks["ingested"] = time.perf_counter()

        logging.getLogger("rustbpe").addHandler(Mark())
        logging.getLogger("rustbpe").setLevel(logging.INFO)
        logging.getLogger("rustbpe").propagate = False
        tok = rustbpe.Tokenizer()
        t0 = time.perf_counter()
        tok.train_from_iterator(iter(docs), vocab, pattern=PATTERN)
        t1 = time.perf_counter()
        split = marks.get("ingested")
        save_ranks(tok.get_mergeable_ranks(), corpus, vocab, kind)
        return {"train_s": t1 - t0, "ingest_s": split and split - t0, "merge_s": split and t1 - split,
                "vocab": len(tok.get_mergeable_ranks())}
    if kind == "hf":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=0, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        t0 = time.perf_counter()
        tok.train_from_iterator(docs, trainer)
        return {"train_s": time.perf_counter() - t0, "ingest_s": None, "merge_s": None, "vocab": tok.get_vocab_size()}
    raise ValueError(kind)


def run_worker(python: str, kind: str, vocab: int, corpus: Path) -> dict:
    """Runs one worker in a fresh process, so that its peak RSS is its own."""
    cmd = [python, os.path.abspath(__file__), "--worker", kind, "--vocab", str(vocab), "--corpus", str(corpus)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) if kind != "nanochat" else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------


def nanochat_python() -> tuple[str | None, str]:
    """Python of a venv with nanochat's rustbpe from PyPI, created on first use."""
    venv = cache_dir() / "rustbpe-venv"
    py = venv / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        if subprocess.run([str(py), "-c", "import rustbpe"], capture_output=True).returncode != 0:
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", "rustbpe"], capture_output=True, text=True)
            if r.returncode != 0:
                return None, "pip install rustbpe failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        v = subprocess.run([str(py), "-m", "pip", "show", "rustbpe"], capture_output=True, text=True).stdout
        version = next((line.split()[-1] for line in v.splitlines() if line.startswith("Version")), "?")
        return str(py), f"rustbpe {version} (PyPI)"
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"could not set up {venv}: {e}"


def encode_bench(corpus: Path, vocab: int, docs: list[str]) -> list[tuple[str, float]]:
    import tiktoken

    ranks = load_ranks(corpus, vocab, "ours")
    if ranks is None:
        return []
    ranks = dict(ranks)
    enc = tiktoken.Encoding(name=f"bench{vocab}", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    mb = sum(len(d.encode()) for d in docs) / 1e6
    out = []
    t0 = time.perf_counter()
    n_tokens = sum(len(enc.encode_ordinary(d)) for d in docs)
    out.append(("tiktoken encode_ordinary, 1 thread", mb / (time.perf_counter() - t0)))
    threads = os.cpu_count() or 1
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(docs, num_threads=threads)
    out.append((f"tiktoken encode_ordinary_batch, {threads} threads", mb / (time.perf_counter() - t0)))
    out.append(("bytes/token", mb * 1e6 / n_tokens))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-sizes", default="8192,65536")
    ap.add_argument("--corpus-mb", type=int, default=50)
    ap.add_argument("--skip-peers", action="store_true", help="only time jaxchat.rustbpe")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        docs = load_docs(args.corpus)
        with open("/proc/self/statm") as f:  # resident pages with the corpus loaded, before training
            base_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        res = worker(args.worker, args.vocab, args.corpus, docs)
        res["base_mb"] = base_mb
        # Peak RSS of this process since exec (ru_maxrss would include the parent's RSS at fork).
        with open("/proc/self/status") as f:
            res["rss_mb"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        print(json.dumps(res))
        return

    corpus = build_corpus(args.corpus_mb)
    raw = corpus.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    docs = load_docs(corpus)
    meta = corpus.with_suffix(".json")
    parts = json.loads(meta.read_text()) if meta.exists() else {}
    print(f"corpus: {corpus}")
    print(f"  {len(raw) / 1e6:.1f} MB, {len(docs)} docs (<= {DOC_CAP} chars), sha256 {digest}")
    print(f"  MB by source: {parts}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other processes skew timings)")

    trainers = [("jaxchat.rustbpe", sys.executable, "ours")]
    if not args.skip_peers:
        py, note = nanochat_python()
        print(f"nanochat: {note}")
        if py:
            trainers.append(("nanochat rustbpe", py, "nanochat"))
        trainers.append(("HF tokenizers", sys.executable, "hf"))

    vocabs = [int(v) for v in args.vocab_sizes.split(",")]

    def num(x, width):
        return f"{x:>{width}.2f}" if x is not None else f"{'-':>{width}}"

    print()
    print(f"{'trainer':<17} {'vocab':>6} {'tokens':>6} {'train s':>8} {'ingest s':>9} {'merge s':>8} "
          f"{'peak RSS MB':>12} {'RSS before MB':>14}")
    for vocab in vocabs:
        for name, py, kind in trainers:
            ranks_path(corpus, vocab, kind).unlink(missing_ok=True)
            r = run_worker(py, kind, vocab, corpus)
            if "error" in r:
                print(f"{name:<17} {vocab:>6}  failed: {r['error']}")
                continue
            print(f"{name:<17} {vocab:>6} {r['vocab']:>6} {num(r['train_s'], 8)} {num(r['ingest_s'], 9)} "
                  f"{num(r['merge_s'], 8)} {num(r['rss_mb'], 12)} {num(r['base_mb'], 14)}", flush=True)
        ours, theirs = load_ranks(corpus, vocab, "ours"), load_ranks(corpus, vocab, "nanochat")
        if ours:
            distinct = len({b for b, _ in ours})
            print(f"{'':<17} {vocab:>6}  ours: {distinct}/{len(ours)} distinct token byte strings", end="")
            if theirs:
                diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
                same = diff is None and len(ours) == len(theirs)
                print("; ranks identical to nanochat's" if same else f"; ranks differ from nanochat's at rank {diff}",
                      end="")
            print()
    print()
    for vocab in vocabs:
        for what, value in encode_bench(corpus, vocab, docs):
            unit = "" if what == "bytes/token" else " MB/s"
            print(f"vocab {vocab:>6}: {what:<40} {value:8.2f}{unit}")


if __name__ == "__main__":
    main()
