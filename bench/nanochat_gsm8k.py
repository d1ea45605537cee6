"""GSM8K generation speed with nanochat's own Engine, for bench/eval.py's side-by-side figure.

nanochat's chat_eval reads GSM8K from the Hugging Face hub, which this machine cannot reach; this script does what
its generative loop does (one problem at a time: render_for_completion, Engine.generate_batch with num_samples
completions, decode, check '#### n') on a local GSM8K test file. Run it from the nanochat checkout with its venv:

    cd $NANOCHAT_DIR && NANOCHAT_BASE_DIR=... .venv/bin/python PATH/bench/nanochat_gsm8k.py --gsm8k test.jsonl -g bench_d4

The last line of stdout is a JSON document with the figures.
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.getcwd())  # the nanochat checkout
from nanochat.checkpoint_manager import load_model  # noqa: E402
from nanochat.common import compute_init  # noqa: E402
from nanochat.engine import Engine  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gsm8k", required=True, help="GSM8K test.jsonl (question/answer per line)")
    p.add_argument("-i", "--source", default="base")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-x", "--max-problems", type=int, default=16)
    p.add_argument("-n", "--num-samples", type=int, default=8)
    p.add_argument("-m", "--max-new-tokens", type=int, default=256)
    p.add_argument("-t", "--temperature", type=float, default=1.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    args = p.parse_args()
    _, _, _, _, device = compute_init("cpu")
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag)
    engine = Engine(model, tokenizer)
    with open(args.gsm8k) as f:
        rows = [json.loads(line) for line in f][:args.max_problems]
    passed, t0 = 0, time.perf_counter()
    for row in rows:
        conversation = {"messages": [{"role": "user", "content": row["question"]},
                                     {"role": "assistant", "content": row["answer"]}]}
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                           temperature=args.temperature, top_k=args.top_k)
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        answers = [re.search(r"#### (\-?[0-9\.\,]+)", tokenizer.decode(r[len(prompt):])) for r in results]
        passed += any(a and a.group(1).replace(",", "") == gold for a in answers)
    dt = time.perf_counter() - t0
    print(f"nanochat {args.source}/{meta.get('model_tag', args.model_tag)}: {len(rows)} problems × {args.num_samples} "
          f"samples × ≤{args.max_new_tokens} tokens in {dt:.1f}s = {len(rows) / dt:.3f} problems/s (pass@{args.num_samples} "
          f"{passed}/{len(rows)})")
    print(json.dumps({"problems": len(rows), "seconds": dt, "problems_per_sec": len(rows) / dt, "passed": passed}))


if __name__ == "__main__":
    main()
