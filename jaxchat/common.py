"""Small helpers every stage uses: the base directory, logging, a file lock."""
import contextlib
import fcntl
import logging
import os


def get_base_dir():
    """Where data, tokenizer, checkpoints and logs live: $JAXCHAT_BASE_DIR, else ~/.cache/jaxchat (as nanochat's)."""
    base = os.environ.get("JAXCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxchat")
    os.makedirs(base, exist_ok=True)
    return base


def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on `path` (created if missing) so parallel processes don't build the same file twice."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class UserError(Exception):
    """Bad input from the user (missing file, bad flag, damaged data): the CLI prints the message, not a traceback."""


def run_main(main):
    """Entry point of a stage: run main(); bad user input ends with one 'error: ...' line, not a traceback."""
    import sys
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
