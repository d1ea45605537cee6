"""CORE: the base-model benchmark of DCLM (arXiv 2406.11794) as nanochat scores it.

22 in-context tasks of three kinds, each example scored from one forward pass over its prompts:
  multiple_choice   one prompt per choice ("{query}{delim}{choice}"); the answer span is what follows the choices'
                    common token prefix; the choice with the lowest MEAN cross-entropy over its span wins.
  schema            one prompt per context option, the continuation fixed; the span is the common token suffix;
                    lowest mean cross-entropy wins.
  language_modeling one prompt; correct iff the greedy argmax reproduces every continuation token.
Few-shot examples come before the item, separated by blank lines. Accuracy is centered on the task's random
baseline, and CORE is the mean of the centered accuracies.

Unlike nanochat (one forward per example), sequences of many examples go through the model together: sorted by
length, right-padded with BOS to a bucket length (powers of two; 1.5x steps too above 256), so one jitted function
compiles once per (rows, bucket).
A prompt longer than the model's context keeps its last sequence_len tokens (the answer is at the end).
The bundle (core.yaml, eval_meta_data.csv, eval_data/) is nanochat's eval_bundle.zip; see get_eval_bundle.
"""
import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import yaml  # PyYAML: already required by flax and orbax-checkpoint
from flax import nnx
from tqdm import tqdm

from jaxchat import distributed, sharding
from jaxchat.common import UserError, file_lock, get_base_dir, pad_bucket
from jaxchat.download import BadFile, download_file

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BATCH_TOKENS = 16384  # tokens per forward per batch shard: bounds the activations of one forward
MIN_BUCKET = 16
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# ---- prompts (pure, host) -------------------------------------------------------------------------------------


def fewshot_indices(n, idx, k):
    """nanochat's `Random(1234 + idx).sample([i for i in range(n) if i != idx], k)` without building the list:
    sample() only looks at len() and positions, and position j of that list holds j, or j + 1 past idx."""
    return [j + (j >= idx) for j in random.Random(1234 + idx).sample(range(n - 1), k)]


def render_prompts(item, task_type, delim, fewshot=()):
    """The prompt strings of one example, as nanochat's Jinja templates render them."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delim}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        # contexts are stripped (some carry trailing whitespace), and so is the prompt without the continuation,
        # so that its tokens are a clean prefix of the prompt with it
        shots = "".join(f"{str(ex['context']).strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        head = f"{shots}{str(item['context']).strip()}{delim}"
        return [head.strip(), f"{head}{item['continuation']}"]
    raise ValueError(f"unsupported task type {task_type!r}; types: {', '.join(TASK_TYPES)}")


def answer_spans(tokens, task_type):
    """(start, end) of the scored tokens of each of an example's token lists (BOS included)."""
    # os.path.commonprefix works on any sequences: here the token lists' common prefix (or, reversed, suffix)
    if task_type == "multiple_choice":
        start = len(os.path.commonprefix(tokens))
        return [(start, len(t)) for t in tokens]
    if task_type == "schema":
        n = len(os.path.commonprefix([t[::-1] for t in tokens]))
        return [(len(t) - n, len(t)) for t in tokens]
    without, with_ = tokens
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise ValueError("language_modeling: the prompt without the continuation does not tokenize to a prefix of "
                         "the prompt with it")
    return [(len(without), len(with_))]


def crop_left(tokens, start, end, max_len):
    """Keep the last max_len tokens (the answer sits at the end) and shift the span; the first kept token has no
    prediction, so a span can start at 1 at the earliest."""
    cut = max(0, len(tokens) - max_len)
    return tokens[cut:], max(start - cut, 1), end - cut


def prepare_task(tokenizer, data, task_meta, max_len, chunk=1024):
    """Every example's rows: (int32 tokens, span start, span end, example index), cropped to max_len. Examples are
    tokenized a chunk at a time (tokens as Python ints are large)."""
    task_type, k, delim = task_meta["task_type"], task_meta["num_fewshot"], task_meta["continuation_delimiter"]
    shots = min(k, len(data) - 1)  # (nanochat fails when a crop leaves fewer examples than shots)
    rows = []
    for lo in range(0, len(data), chunk):
        prompts = []
        for idx in range(lo, min(lo + chunk, len(data))):
            fewshot = [data[i] for i in fewshot_indices(len(data), idx, shots)] if shots > 0 else ()
            prompts.append(render_prompts(data[idx], task_type, delim, fewshot))
        tokens = iter(tokenizer.encode([p for ps in prompts for p in ps], prepend=tokenizer.get_bos_token_id()))
        for idx, ps in enumerate(prompts, start=lo):
            group = [next(tokens) for _ in ps]
            spans = answer_spans(group, task_type)
            if task_type == "language_modeling":
                group = group[1:]  # only the prompt with the continuation goes through the model
            for t, (s, e) in zip(group, spans):
                t, s, e = crop_left(t, s, e, max_len)
                rows.append((np.asarray(t, np.int32), s, e, idx))
    return rows


# ---- the device: per-token losses and greedy predictions of a batch --------------------------------------------


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    """Next-token cross-entropy and greedy (argmax) prediction at every position of (B, T) ids (the last column is
    meaningless), from the model's chunked loss: no (B, T, V) logits."""
    return nnx.merge(graphdef, state).token_losses(ids, jnp.roll(ids, -1, axis=1))


def bucket_len(n, max_len):
    """Padded length of an n-token row: the next power of two (at least MIN_BUCKET), or from 384 on the next of
    2^k and 1.5·2^k (long rows then waste at most a third, not half), capped at max_len."""
    p = pad_bucket(n, minimum=MIN_BUCKET)
    return min(3 * p // 4 if p >= 512 and n <= 3 * p // 4 else p, max_len)


def plan_batches(lengths, max_len, shards=1, batch_tokens=BATCH_TOKENS):
    """Group row indices into (rows, bucket, [indices]) batches: longest first, a full batch of a bucket holds
    shards·batch_tokens/bucket rows, and the last one of a bucket is padded to a power of two of at least 1/8 of
    that (few shapes, so few compiles; little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, i = [], 0
    while i < len(order):
        bucket = bucket_len(lengths[order[i]], max_len)
        full = shards * max(1, batch_tokens // bucket)
        same = [j for j in order[i:i + full] if bucket_len(lengths[j], max_len) == bucket]
        rows = min(full, max(pad_bucket(len(same), minimum=1), full // 8))
        batches.append((sharding.round_up_to_shards(rows, shards), bucket, same))
        i += len(same)
    return batches


def score_rows(model, rows, pad_id, max_len, batch_tokens=BATCH_TOKENS, desc=None):
    """Mean cross-entropy and greedy exact match over each row's span: two arrays (n_rows,). Under a mesh
    (`jax.set_mesh`), the rows of a batch are split over its batch axes."""
    graphdef, state = nnx.split(model)
    shards = sharding.batch_shards()
    mean_loss, exact = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)

    def collect(out, members, ids):
        nll, pred = sharding.to_host(out)
        for b, r in enumerate(members):
            _, s, e, _ = rows[r]
            mean_loss[r] = nll[b, s - 1:e - 1].mean() if e > s else np.inf
            exact[r] = np.array_equal(pred[b, s - 1:e - 1], ids[b, s:e])
        bar.update(len(members))

    pending = None
    with tqdm(total=len(rows), desc=desc, unit="seq", leave=False, disable=desc is None) as bar:
        for n_rows, bucket, members in plan_batches([len(r[0]) for r in rows], max_len, shards, batch_tokens):
            ids = np.full((n_rows, bucket), pad_id, np.int32)
            for b, r in enumerate(members):
                ids[b, :len(rows[r][0])] = rows[r][0]
            # dispatched asynchronously: the host prepares the next batch meanwhile
            out = _forward(graphdef, state, sharding.shard_batch(ids))
            if pending is not None:
                collect(*pending)
            pending = (out, members, ids)
        if pending is not None:
            collect(*pending)
    return mean_loss, exact


def example_correct(model, tokenizer, data, task_meta, max_len=None, batch_tokens=BATCH_TOKENS, desc=None):
    """0/1 per example of `data` (float array)."""
    max_len = max_len or model.config.sequence_len
    rows = prepare_task(tokenizer, data, task_meta, max_len)
    mean_loss, exact = score_rows(model, rows, tokenizer.get_bos_token_id(), max_len, batch_tokens, desc)
    if task_meta["task_type"] == "language_modeling":  # one row per example, in order
        return exact.astype(np.float64)
    losses = {}  # example index -> the mean losses of its rows, in choice order
    for (*_, idx), loss in zip(rows, mean_loss):
        losses.setdefault(idx, []).append(loss)
    return np.array([float(np.argmin(losses[idx]) == example["gold"]) for idx, example in enumerate(data)])


def evaluate_task(model, tokenizer, data, task_meta, **kw):
    """Accuracy of the model on one task's examples (nanochat's name; task_meta: task_type, num_fewshot,
    continuation_delimiter). Keywords: max_len (default the model's sequence_len), batch_tokens, desc."""
    return float(example_correct(model, tokenizer, data, task_meta, **kw).mean()) if data else 0.0


# ---- the bundle ------------------------------------------------------------------------------------------------


class BundleMissing(UserError):
    """No CORE bundle on disk and downloading it was not allowed."""


def _check_zip(path):
    try:
        with zipfile.ZipFile(path) as z:
            names, damaged = set(z.namelist()), z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise BadFile(f"not a zip file ({e})") from None
    if damaged:
        raise BadFile(f"damaged member {damaged}")
    if not names & {"core.yaml", "eval_bundle/core.yaml"}:
        raise BadFile("no core.yaml in the zip")


def _extract(zip_path, target):
    """Unzip into a temporary directory beside target, then rename: target is either absent or complete."""
    tmp = tempfile.mkdtemp(prefix=".eval_bundle.", dir=os.path.dirname(target))
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        src = os.path.join(tmp, "eval_bundle") if os.path.isdir(os.path.join(tmp, "eval_bundle")) else tmp
        os.replace(src, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_eval_bundle(bundle_dir=None, download=True, url=EVAL_BUNDLE_URL, **download_kw):
    """The CORE bundle directory: `bundle_dir`, else $JAXCHAT_EVAL_BUNDLE, else $JAXCHAT_BASE_DIR/eval_bundle,
    which is fetched (nanochat's eval_bundle.zip) and unpacked when missing, unless download=False."""
    if explicit := bundle_dir or os.environ.get("JAXCHAT_EVAL_BUNDLE"):
        if not os.path.isfile(os.path.join(explicit, "core.yaml")):
            raise UserError(f"no CORE eval bundle at {explicit} (no core.yaml there); pass --eval-bundle DIR with "
                            f"core.yaml, eval_meta_data.csv and eval_data/")
        return explicit
    base = get_base_dir()
    target = os.path.join(base, "eval_bundle")
    how = "pass --eval-bundle DIR (or set JAXCHAT_EVAL_BUNDLE)"
    with file_lock(os.path.join(base, ".eval_bundle.lock")):  # one process downloads and unpacks; others wait
        if os.path.isfile(os.path.join(target, "core.yaml")):
            return target
        if os.path.exists(target):
            raise UserError(f"{target} holds no core.yaml: remove it to download the bundle again, or {how}")
        if not download:
            raise BundleMissing(f"no eval bundle at {target} and downloading is off (--download-bundle=0); {how}, "
                                f"or run once with --download-bundle=1")
        zip_path = os.path.join(base, "eval_bundle.zip")
        download_file(url, zip_path, check=_check_zip, what="CORE eval bundle", **download_kw)
        _extract(zip_path, target)
        print(f"CORE eval bundle unpacked at {target}")
    return target


def load_bundle(bundle_dir):
    """(tasks, random baselines in %) of a bundle. Each task: label, task_type, num_fewshot,
    continuation_delimiter (default " "), dataset_uri and its path; every task file must exist."""
    def read(name, parse):
        path = os.path.join(bundle_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                return parse(f)
        except (OSError, yaml.YAMLError, csv.Error) as e:
            raise UserError(f"CORE bundle {bundle_dir}: cannot read {name}: {e}") from None

    config = read("core.yaml", yaml.safe_load)
    tasks = []
    try:
        for t in config["icl_tasks"]:
            shots = t["num_fewshot"]
            tasks.append({"label": t["label"], "task_type": t["icl_task_type"], "dataset_uri": t["dataset_uri"],
                          "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                          "continuation_delimiter": t.get("continuation_delimiter", " "),
                          "path": os.path.join(bundle_dir, "eval_data", t["dataset_uri"])})
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise UserError(f"CORE bundle {bundle_dir}: core.yaml: bad icl_tasks entry ({type(e).__name__}: {e})") from None
    try:
        meta = read("eval_meta_data.csv", lambda f: list(csv.DictReader(f)))
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in meta}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"CORE bundle {bundle_dir}: eval_meta_data.csv: needs 'Eval Task' and numeric 'Random "
                        f"baseline' columns ({type(e).__name__}: {e})") from None
    for t in tasks:
        if t["task_type"] not in TASK_TYPES:
            raise UserError(f"CORE bundle {bundle_dir}: task {t['label']}: unknown type {t['task_type']!r}")
        if t["label"] not in baselines:
            raise UserError(f"CORE bundle {bundle_dir}: eval_meta_data.csv has no random baseline for {t['label']}")
    if missing := [t["path"] for t in tasks if not os.path.isfile(t["path"])]:
        raise UserError(f"CORE bundle {bundle_dir} is incomplete: missing {', '.join(missing)}; pass --eval-bundle "
                        f"DIR with a complete bundle (or remove {bundle_dir} to download it again)")
    return tasks, baselines


def find_bundle(bundle_dir=None, download=True):
    """The CORE bundle's directory, checked complete, before any compute (a problem shows at once); None, with a
    note printed, when there is none and it may not be downloaded. Process 0 downloads, the others then find it."""
    try:
        bundle = distributed.writer_first("eval_bundle", lambda: get_eval_bundle(bundle_dir, download=download))
        load_bundle(bundle)
        return bundle
    except BundleMissing as e:
        print(f"CORE skipped: {e}")
        return None


def load_task_data(path, max_per_task=-1):
    """A task's examples, shuffled with Random(1337) and cropped to max_per_task (> 0), as nanochat does."""
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered(accuracy, baseline_percent):
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def evaluate_model(model, tokenizer, max_per_task=-1, bundle_dir=None, download=True, **kw):
    """CORE of a base model: {"results": {label: accuracy}, "centered_results": {label: centered},
    "core_metric": mean centered}. Prints one line per task. Keywords as evaluate_task's (max_len, ...)."""
    tasks, baselines = load_bundle(get_eval_bundle(bundle_dir, download))
    results, centered_results = {}, {}
    print(f"{'task':<35} {'shots':>5} {'type':<17} {'n':>6} {'accuracy':>9} {'centered':>9} {'time':>8}")
    for task in tasks:
        t0, label = time.time(), task["label"]
        data = load_task_data(task["path"], max_per_task)
        results[label] = evaluate_task(model, tokenizer, data, task, desc=label, **kw)
        centered_results[label] = centered(results[label], baselines[label])
        print(f"{label:<35} {task['num_fewshot']:>5} {task['task_type']:<17} {len(data):>6} {results[label]:>9.4f} "
              f"{centered_results[label]:>9.4f} {time.time() - t0:>7.1f}s", flush=True)
    core = sum(centered_results.values()) / len(centered_results)
    print(f"{'CORE':<35} {'':>5} {'':<17} {'':>6} {'':>9} {core:>9.4f}")
    return {"results": results, "centered_results": centered_results, "core_metric": core}


def write_csv(path, out):
    """nanochat's CSV: Task, Accuracy, Centered per task, then a CORE row (columns padded for reading)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in out["results"].items():
            f.write(f"{label:<35}, {acc:<10.6f}, {out['centered_results'][label]:<10.6f}\n")
        f.write(f"{'CORE':<35}, {'':<10}, {out['core_metric']:<10.6f}\n")
    return path
