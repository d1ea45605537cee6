"""Train the BPE tokenizer on pretraining text: `python -m jaxchat.tok_train [--vocab-size N] [--max-chars N] ...`

Reads the train split (all shards but the last), crops each document to --doc-cap characters, stops after
--max-chars, trains in Rust, and saves the tokenizer and token_bytes to $JAXCHAT_BASE_DIR/tokenizer.
"""
import argparse
import os
import time

import numpy as np
from tqdm import tqdm

from jaxchat import distributed
from jaxchat.common import flag_adder, get_base_dir, number, positive_int
from jaxchat.corpus import iter_texts
from jaxchat.distributed import run_main
from jaxchat.report_card import get_report
from jaxchat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer


def build_parser():
    # nanochat spelled these with underscores (OCT) and dashes (HEAD); both work here
    p = argparse.ArgumentParser(description="Train the jaxchat BPE tokenizer.")
    add = flag_adder(p)
    add("vocab_size", type=number(int, 256 + len(SPECIAL_TOKENS)), default=65536,
        help="vocabulary incl. 9 specials (65536)")
    add("max_chars", type=positive_int, default=10_000_000_000, help="stop after this many characters")
    add("doc_cap", type=positive_int, default=10_000, help="crop each document to this many characters")
    add("data_dir", default=None, help="pretraining shards (default: $JAXCHAT_BASE_DIR/base_data)")
    add("out_dir", default=None, help="where to save (default: $JAXCHAT_BASE_DIR/tokenizer)")
    return p


@distributed.one_writer  # several processes: process 0 writes the files, the others wait for them
def main(argv=None):
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir or os.path.join(get_base_dir(), "tokenizer")
    bar = tqdm(total=args.max_chars if args.max_chars < 1e12 else None, unit="char", unit_scale=True, desc="tok_train read")

    def texts():
        for doc in iter_texts("train", args.data_dir, max_chars=args.max_chars, doc_cap=args.doc_cap):
            bar.update(len(doc))
            yield doc

    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(texts(), args.vocab_size)
    train_time = time.time() - t0
    bar.close()
    tokenizer.save(out_dir)
    token_bytes = tokenizer.token_bytes()
    nonzero = token_bytes[token_bytes > 0].astype(np.float64)
    print(f"trained on {bar.n:,} characters in {train_time:.2f}s; vocab {tokenizer.get_vocab_size():,}; "
          f"saved to {out_dir}")
    print(f"token bytes (specials excluded): min {int(nonzero.min())} max {int(nonzero.max())} "
          f"mean {nonzero.mean():.4f} std {nonzero.std():.4f}; {len(token_bytes) - len(nonzero)} special tokens")
    out = {"max_chars": args.max_chars, "doc_cap": args.doc_cap, "train_time": train_time, "num_chars": bar.n,
           "vocab_size": tokenizer.get_vocab_size(), "num_special_tokens": len(token_bytes) - len(nonzero),
           "token_bytes_min": int(nonzero.min()), "token_bytes_max": int(nonzero.max()),
           "token_bytes_mean": float(nonzero.mean()), "token_bytes_std": float(nonzero.std())}
    get_report().log("Tokenizer training", out)
    return out


if __name__ == "__main__":
    run_main(main)
