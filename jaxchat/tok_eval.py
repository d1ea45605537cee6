"""Evaluate the tokenizer: bytes per token on a few fixed texts and on the train/val data, beside GPT-2 and GPT-4.

`python -m jaxchat.tok_eval`. The GPT-2/GPT-4 encodings come through tiktoken, which downloads their vocab files the
first time; offline, those comparisons are skipped with the reason, and ours is still printed.
"""
import argparse

from jaxchat import distributed
from jaxchat.common import UserError, flag_adder
from jaxchat.corpus import parquets_iter_batched
from jaxchat.distributed import run_main
from jaxchat.report_card import get_report
from jaxchat.tokenizer import RustBPETokenizer, get_tokenizer

# Fixed texts, written for jaxchat, one per kind of text a tokenizer meets.
SAMPLES = {
    "news": (
        "The city council voted 7-2 on Tuesday to extend the riverside bike path by 4.5 kilometres, a project first "
        "proposed in 2019. Construction is expected to begin next spring and to cost about $12 million, most of it "
        "covered by a regional transport grant. \"People have been asking for this for years,\" said councillor Maria "
        "Okafor, who chairs the transport committee. Opponents argued that the money would be better spent repairing "
        "existing roads, several of which were damaged in last winter's floods."),
    "korean": (
        "안녕하세요. 오늘은 날씨가 정말 좋네요. 저는 아침에 공원에서 산책을 하고 친구와 함께 커피를 마셨습니다. "
        "내일은 도서관에 가서 역사 책을 읽을 계획입니다."),
    "code": (
        "def moving_average(values, window):\n"
        "    \"\"\"Return the running mean of `values` over `window` items.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total, out = 0.0, []\n"
        "    for i, v in enumerate(values):\n"
        "        total += v\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "        out.append(total / min(i + 1, window))\n"
        "    return out\n"),
    "math": (
        r"For every integer $n \geq 1$ we have $\sum_{k=1}^{n} (2k-1) = n^2$. Proof by induction: the case $n=1$ "
        r"gives $1 = 1^2$. If $\sum_{k=1}^{n} (2k-1) = n^2$, then $\sum_{k=1}^{n+1} (2k-1) = n^2 + 2n + 1 = (n+1)^2$. "
        r"\begin{equation} \int_0^1 x^2 \, dx = \left[ \frac{x^3}{3} \right]_0^1 = \frac{1}{3}. \end{equation}"),
    "science": (
        "Enzymes are proteins that speed up chemical reactions without being consumed by them. Each enzyme has an "
        "active site whose shape and charge fit a particular substrate; binding lowers the activation energy of the "
        "reaction. Temperature and pH change the enzyme's structure, which is why most human enzymes work best near "
        "37 degrees Celsius and a pH close to 7.4."),
}


# r50k_base is GPT-2's vocabulary in a single file (tiktoken's "gpt2" needs two)
BASELINES = {"gpt2": "r50k_base", "gpt4": "cl100k_base"}


def build_parser():
    p = argparse.ArgumentParser(description="Compare the trained tokenizer's compression with GPT-2 and GPT-4.")
    add = flag_adder(p)
    add("tokenizer_dir", default=None, help="default: $JAXCHAT_BASE_DIR/tokenizer")
    add("data_dir", default=None, help="default: $JAXCHAT_BASE_DIR/base_data")
    add("compare", default="gpt2,gpt4", help="baselines to compare with (gpt2, gpt4; '' for none)")
    return p


@distributed.one_writer  # several processes: process 0 writes the files, the others wait for them
def main(argv=None):
    args = build_parser().parse_args(argv)
    ours = get_tokenizer(args.tokenizer_dir)
    texts = dict(SAMPLES)
    for split in ("train", "val"):  # as nanochat: the first row group of the first train shard and of the val shard
        try:
            texts[f"data-{split}"] = "\n".join(next(parquets_iter_batched(split, data_dir=args.data_dir)))
        except (UserError, StopIteration) as e:
            print(f"[skip] data-{split}: {e}")
    labels = [x for x in args.compare.split(",") if x]
    if unknown := [x for x in labels if x not in BASELINES]:
        raise UserError(f"--compare: unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    baselines, skipped = {}, {}
    for label in labels:
        try:
            baselines[label] = RustBPETokenizer.from_pretrained(BASELINES[label])
        except Exception as e:  # tiktoken raises requests/OSError/ValueError variants when offline
            skipped[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    results = {}
    for label, tok in [("ours", ours)] + list(baselines.items()):
        for name, text in texts.items():
            ids = tok.encode(text)
            assert tok.decode(ids) == text, f"{label} does not round-trip {name}"
            results[(label, name)] = (len(text.encode("utf-8")), len(ids))

    print(f"\nvocab size: ours {ours.get_vocab_size():,}" +
          "".join(f", {k} {v.get_vocab_size():,}" for k, v in baselines.items()))
    header = f"{'text':<12}{'bytes':>9}{'ours tok':>10}{'ours B/t':>10}" + "".join(
        f"{label + ' tok':>10}{label + ' B/t':>10}{'diff %':>9}" for label in baselines)
    print(header)
    print("-" * len(header))
    for name in texts:
        nbytes, n_ours = results[("ours", name)]
        row = f"{name:<12}{nbytes:>9,}{n_ours:>10,}{nbytes / n_ours:>10.2f}"
        for label in baselines:
            n_base = results[(label, name)][1]
            # nanochat's "relative diff": positive = we use fewer tokens than the baseline
            row += f"{n_base:>10,}{nbytes / n_base:>10.2f}{100 * (n_base - n_ours) / n_base:>+9.1f}"
        print(row)
    for label, why in skipped.items():
        print(f"[skip] {label} comparison: tiktoken could not load {BASELINES[label]} ({why}); offline, a copy of "
              f"its vocab file in $TIKTOKEN_CACHE_DIR works")
    rows = []
    for name in texts:
        nbytes, n_ours = results[("ours", name)]
        row = {"text": name, "bytes": nbytes, "ours tokens": n_ours, "ours bytes/token": nbytes / n_ours}
        rows.append(row | {f"{label} bytes/token": nbytes / results[(label, name)][1] for label in baselines})
    get_report().log("Tokenizer evaluation", {"vocab size": ours.get_vocab_size(), "compression": rows,
                                              "baselines not compared": skipped})
    return {"results": results, "skipped": skipped}


if __name__ == "__main__":
    run_main(main)
