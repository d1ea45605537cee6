"""Small helpers every stage uses: the base directory, a file lock, padding buckets, flag types, atomic writes."""
import argparse
import contextlib
import fcntl
import math
import os


def get_base_dir(create=True):
    """Where data, tokenizer, checkpoints and logs live: $JAXCHAT_BASE_DIR, else ~/.cache/jaxchat (as nanochat's)."""
    base = os.environ.get("JAXCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxchat")
    if create:
        os.makedirs(base, exist_ok=True)
    return base


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on `path` (created if missing) so parallel processes don't build the same file twice."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def pad_bucket(n, cap=None, minimum=16):
    """The length to pad n up to: the next power of two, at least `minimum`, at most `cap`. Jitted functions see
    few shapes, so they compile once per bucket instead of once per length."""
    size = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return size if cap is None else min(size, cap)


def flag_adder(parser):
    """add(name, *short, ...) registers --name-with-dashes and --name_with_underscores (nanochat's scripts take
    both), and any short forms: add("model_tag", "-g", default=None)."""
    def add(name, *short, **kw):
        long = dict.fromkeys((f"--{name.replace('_', '-')}", f"--{name}"))  # one of each for a name with no "_"
        return parser.add_argument(*short, *long, **kw)
    return add


def number(kind, low, high=None, unset=None):
    """The `type=` of a numeric flag: a finite `kind` (int or float) from `low` to `high`, or exactly `unset`.

    Every stage's numeric flags use it, so that a value out of range is argparse's one error line (or the
    launcher's, which calls it on a config's values) instead of a traceback later or a run that silently differs.
    `unset` is nanochat's -1 where nanochat gives it a meaning (the default horizon, never, all, the last step);
    no other value below `low` means anything. `kind` is read by the launcher to type-check TOML values."""
    rule = " and ".join([f"≥ {low}"] + [f"≤ {high}"] * (high is not None)) + f", or {unset}" * (unset is not None)

    def parse(text):
        value = kind(text)  # ValueError: argparse says "invalid int value: 'x'"
        within = low <= value and (high is None or value <= high) and (kind is int or math.isfinite(value))
        if not within and value != unset:  # NaN is within nothing
            raise argparse.ArgumentTypeError(f"must be {rule}; got {text}")
        return value

    parse.__name__, parse.kind = kind.__name__, kind
    return parse


positive_int = number(int, 1)  # sizes and counts
non_negative_int = number(int, 0)  # where 0 means "the default" or "off"
count_or_unset = number(int, 1, unset=-1)  # nanochat's -1: the default horizon, never (for *_every), all
step_or_last = number(int, 0, unset=-1)  # a checkpoint's step; -1: the last
non_negative_float = number(float, 0)  # learning rates, weight decay, temperatures
fraction = number(float, 0, 1)
random_seed = number(int, 0, 2 ** 31 - 1)  # JAX folds larger seeds (without x64) onto small ones: 2**40 would be seed 0
SWITCH = {"type": int, "choices": (0, 1)}  # an on/off flag, as nanochat writes them: add("resume", **SWITCH, ...)


def write_atomic(path, data):
    """Write `path` whole, then rename: a reader never sees half a file. `data`: bytes, or a function that writes
    into the open binary file (`lambda f: np.save(f, array)`)."""
    with open(path + ".tmp", "wb") as f:
        f.write(data) if isinstance(data, bytes) else data(f)
    os.replace(path + ".tmp", path)


class UserError(Exception):
    """Bad input from the user (missing file, bad flag, damaged data): the CLI prints the message, not a traceback."""
