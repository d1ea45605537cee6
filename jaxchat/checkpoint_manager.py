"""Checkpoints: a stage's whole state saved with orbax, restored exactly onto the current mesh, with the tokenizer
it was trained with.

Layout (nanochat's, one directory per step instead of three files):

    $JAXCHAT_BASE_DIR/{base,mid,chatsft,chatrl}_checkpoints/<model_tag>/
        .lock           flock'ed by the one run writing here; holds its pid, host, start time and command line
        tokenizer/      the run's tokenizer (the files `tokenizer.save` writes), copied at its first save
        <step:06d>/
            model/      the parameters (fp32): all that a later stage, an eval or the engine needs
            optim/      the optimizer state (Adam moments, Muon momentum, step count)
            meta/       JSON: the caller's keys (model_config, loop_state, ...), `step`, `tokenizer_fingerprint`,
                        `checksums` (the hash that checksums.json holds)
            checksums.json  {path in the step: hash} of every file of model/, optim/ and meta/

With several processes (jax.distributed) every process calls the same methods on the same path, a filesystem they
all see: orbax writes each process's shards, process 0 the meta, the lock and the tokenizer copy.

A run writes through one Checkpointer: `with Checkpointer(dir, keep).lock() as ckpt:`, then
`ckpt.save(step, model_state, optim_state, meta, tokenizer)`. The lock refuses a second run on the same
directory (both would write, and delete, the same steps); the kernel drops it when its process ends, so a
crashed run never leaves it behind. Readers (`load_model`, evals) never lock. Passing the tokenizer to every save
is the one way a checkpoint learns it; `load_model` refuses any tokenizer whose fingerprint differs.

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-write never
damages an earlier checkpoint. A file damaged afterwards (a full disk, a bad copy, a bad sector) makes its step fail
to restore with one line naming it, and `restore_latest` (resume) falls back to the newest intact step: truncated
or garbled files, and also bytes changed in place (which can still decode, to other numbers), fail the checksums
that every restore verifies before reading. Arrays land with the shardings of the mesh set by `jax.set_mesh` (one
device without one), so a checkpoint saved on one mesh shape loads onto another (orbax re-shards).
"""
import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxchat import distributed, sharding
from jaxchat.common import UserError, flag_adder, get_base_dir, non_negative_int
from jaxchat.model import EXECUTION_FIELDS, GPT, GPTConfig
from jaxchat.tokenizer import get_tokenizer

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}
LOCK_FILE, TOKENIZER_DIR, CHECKSUMS_FILE = ".lock", "tokenizer", "checksums.json"
# Damage detection, not tamper-proofing: any hash that misses random damage with negligible odds would do. sha256
# runs near disk speed on CPUs with SHA extensions (most x86 and ARMv8), and unlike a 32-bit CRC its odds of
# missing damage are nil. Its name goes in each step's meta, so another hash could come later.
CHECKSUM = "sha256"


def checkpoint_dir(source, model_tag):
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}; sources: {', '.join(SOURCE_DIRS)}")
    return os.path.join(get_base_dir(), SOURCE_DIRS[source], model_tag)


def add_checkpoint_flags(parser, several_sources=False):
    """nanochat's -i/-g/-s: which stage's checkpoint, which model tag (the largest d<N>) and step (the last)."""
    add = flag_adder(parser)
    if several_sources:
        add("source", "-i", default="sft", help=f"which stages' checkpoints ({', '.join(sorted(SOURCE_DIRS))}), split by "
                                                f"| or , (mid,sft,rl): evaluated in turn")
    else:
        add("source", "-i", default="sft", choices=sorted(SOURCE_DIRS), help="which stage's checkpoint")
    add("model_tag", "-g", default=None, help="default: the largest d<N>")
    add("step", "-s", type=non_negative_int, default=None, help="default: the last")


def run_dir(source, model_tag=None):
    """The directory of a stage's run, and its tag: `model_tag`, or nanochat's default, the largest d<N>."""
    root = os.path.dirname(checkpoint_dir(source, "x"))
    model_tag = model_tag or find_largest_model(root)
    return os.path.join(root, model_tag), model_tag


def find_largest_model(checkpoints_dir):
    """nanochat's default model tag: the largest d<N> present (else the most recently written tag)."""
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise UserError(f"no checkpoints in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    return max(depths)[1] if depths else max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


class DamagedCheckpoint(UserError):
    """A step that cannot be restored (a file missing, truncated or garbled); `reason` says which item and why."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


class Checkpointer:
    """The steps of one run directory. Saves are asynchronous: `close()` (or leaving a `with` block) waits for
    them and releases the lock."""

    def __init__(self, directory, max_to_keep=2, create=True):
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise UserError(f"no checkpoint directory {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, step_format_fixed_length=6,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._lock_file, self._locked = None, False
        self._fingerprint = None  # of the tokenizer this run saves with, once its copy is on disk
        self._saving = None  # the step being written (orbax writes one at a time)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    # ---- the one writer --------------------------------------------------------------------------------------
    def lock(self):
        """Make this the directory's only writer until close(). Another run holding it (another process, or
        another Checkpointer in this one: flock locks an open file, not a process) is named in one UserError.
        Held by process 0 alone (the run's one writer); the others go on once it holds it. Returns self."""
        if self._locked:
            return self
        if distributed.is_writer():
            self._take_lock()
        distributed.barrier("checkpoint_lock")  # a refused process 0 exits instead: its peers stop
        self._locked = True
        return self

    def _take_lock(self):
        os.makedirs(self.directory, exist_ok=True)
        f = open(os.path.join(self.directory, LOCK_FILE), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read()
            f.close()
            raise UserError(f"{self.directory} is in use by another run ({_describe_holder(holder)}); wait for it "
                            f"to end or use another --model_tag") from None
        f.truncate(0)
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": shlex.join([os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]])}, f)
        f.flush()
        self._lock_file = f

    def clear(self):
        """Delete every step and the tokenizer copy, for a fresh run over an old one (takes the lock)."""
        self.lock()
        for step in self.agreed_steps():
            self.manager.delete(step)  # collective: every process deletes the same steps
        if distributed.is_writer():
            shutil.rmtree(os.path.join(self.directory, TOKENIZER_DIR), ignore_errors=True)
        distributed.barrier("clear")
        self._fingerprint = None

    def save(self, step, model_state, optim_state, meta, tokenizer):
        """Write one step: the model's and the optimizer's NNX states (or pure dicts; optim_state None: weights
        only, a checkpoint to start from but not to resume), the caller's JSON-able meta, and the tokenizer the
        run trains with (its files once, its fingerprint in the meta). Takes the lock."""
        self.lock()
        if self._fingerprint is None:
            self._fingerprint = tokenizer.fingerprint()
            path = os.path.join(self.directory, TOKENIZER_DIR)
            # process 0 copies it; a resumed run's copy is already there (resume checked it: check_tokenizer)
            if distributed.is_writer() and not os.path.isdir(path):
                shutil.rmtree(path + ".tmp", ignore_errors=True)
                tokenizer.save(path + ".tmp")
                os.rename(path + ".tmp", path)  # atomic: a reader sees the whole copy or none
        items = {"model": ocp.args.StandardSave(_pure(model_state)),
                 "meta": ocp.args.JsonSave({**meta, "step": step, "tokenizer_fingerprint": self._fingerprint,
                                            "checksums": CHECKSUM})}
        if optim_state is not None:
            items["optim"] = ocp.args.StandardSave(_pure(optim_state))
        self.manager.wait_until_finished()  # the previous save, whose checksums are written for self._saving
        self._saving = step
        saved = self.manager.save(step, args=ocp.args.Composite(**items))
        if not saved:  # orbax declines (returns False) when a step at or after this one is already on disk
            raise UserError(f"checkpoint step {step} was not written to {self.directory} (steps there: "
                            f"{self.all_steps()})")

    def _write_checksums(self):
        """The checksums of every file of the step being saved, into its checksums.json. orbax calls this on
        process 0 alone once every process has written its files and the items are finalised, just before it
        renames the step's temporary directory into place: the checksums land atomically with the step.

        Why files, hashed here, and not arrays hashed before the save: the files are every byte a restore reads
        (orbax's metadata, the manifests, the data), hashing them needs no device-to-host copy, and a restore
        onto another mesh or another number of processes checks the same files (a hash of each process's shards
        would not match a re-sharded restore). It costs this background thread one read of the step (from the
        page cache, just written) while training goes on."""
        step_dir = self._step_dir(self._saving)
        tmp_dir = step_dir + ocp.path.atomicity.TMP_DIR_SUFFIX
        step_dir = tmp_dir if os.path.isdir(tmp_dir) else step_dir  # (were orbax to rename first: the same files)
        with open(os.path.join(step_dir, CHECKSUMS_FILE), "w") as f:
            json.dump({path: file_checksum(os.path.join(step_dir, path), CHECKSUM)
                       for path in _item_files(step_dir)}, f, indent=0)

    def load_tokenizer(self, meta, where):
        """The tokenizer this run trained with (see `load_model`), checked against the step's `meta`."""
        tokenizer_dir = os.path.join(self.directory, TOKENIZER_DIR)
        if not os.path.isdir(tokenizer_dir):  # every save writes it: this run's files were moved or pruned by hand
            raise UserError(f"{where} has no copy of the tokenizer it was trained with ({tokenizer_dir} is missing): "
                            f"put that tokenizer's files there")
        tokenizer = get_tokenizer(tokenizer_dir)
        check_tokenizer(meta, tokenizer, where, tokenizer_dir)
        return tokenizer

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        """Wait for pending saves, then release the lock (closing the file drops the flock)."""
        try:
            self.wait()
            self.manager.close()
        finally:
            if self._lock_file is not None:
                self._lock_file.close()
            self._lock_file, self._locked = None, False

    # ---- reading ---------------------------------------------------------------------------------------------
    def all_steps(self):
        return sorted(self.manager.all_steps())

    def agreed_steps(self):
        """all_steps() as process 0 sees them, on every process: one answer even where a shared filesystem shows
        hosts a directory listing at different moments (every process calls this together)."""
        return distributed.all_gather_json("steps", self.all_steps())[0]

    def restore_meta(self, step=None):
        """The meta of `step` (default: the latest), verified."""
        step = self._step(step)
        meta = self._restore_item(step, "meta", ocp.args.JsonRestore())
        self._verify(step, meta, "meta")
        return meta

    def restore(self, step, abstract_model_state, abstract_optim_state=None):
        """Restore `step` (None: the latest) into the given abstract NNX states, sharded on the current mesh.
        Returns (model_state, optim_state or None, meta); a damaged step raises DamagedCheckpoint."""
        step = self._step(step)
        meta = self.restore_meta(step)
        self._verify(step, meta, "model", *(() if abstract_optim_state is None else ("optim",)))
        model_state = self._restore_state(step, "model", abstract_model_state)
        optim_state = None if abstract_optim_state is None else self._restore_state(step, "optim", abstract_optim_state)
        return model_state, optim_state, meta

    def newest_meta(self):
        """The meta of the newest step whose meta reads: what a resume checks its settings against before
        `restore_latest` (which also skips a step whose arrays are damaged)."""
        steps = self.all_steps()
        if not steps:
            raise UserError(f"no checkpoint to resume in {self.directory}")
        for step in reversed(steps[1:]):
            with contextlib.suppress(DamagedCheckpoint):
                return self.restore_meta(step)
        return self.restore_meta(steps[0])  # the last candidate: its damage, if any, is the one-line error

    def restore_latest(self, abstract_model_state, abstract_optim_state=None):
        """restore() of the newest intact step, for resuming a run (takes the lock). A damaged newer step is
        named in one line and moved aside to <step>.damaged, kept for a person to look at and out of the way
        of the resumed run, which saves that step again."""
        self.lock()
        damaged = []
        for step in reversed(self.agreed_steps()):
            try:
                restored, reason = self.restore(step, abstract_model_state, abstract_optim_state), None
            except DamagedCheckpoint as e:
                reason = e.reason
            if not distributed.everyone("restored", reason is None):  # each process reads its own shards
                damaged.append(f"step {step} is damaged ({reason or 'on another process'})")
                continue
            for bad in (s for s in self.all_steps() if s > step and distributed.is_writer()):
                _move_aside(self._step_dir(bad))
            distributed.barrier("move_aside")
            self.manager.reload()
            if damaged:
                print(f"{self.directory}: {', '.join(damaged)}: resuming from step {step} (damaged steps moved "
                      f"to <step>.damaged)", file=sys.stderr)
            return restored
        if not damaged:
            raise UserError(f"no checkpoint to resume in {self.directory}")
        raise UserError(f"no intact checkpoint to resume in {self.directory}: {', '.join(damaged)}")

    def _step(self, step):
        step = self.manager.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise UserError(f"no checkpoint {'at step ' + str(step) if step is not None else ''} in {self.directory}"
                            f" (steps present: {self.all_steps() or 'none'})")
        return step

    def _step_dir(self, step):
        return os.path.join(self.directory, f"{step:06d}")

    def _verify(self, step, meta, *items):
        """Compare the files of `items` (meta, model, optim) with the checksums recorded when `step` was saved: a
        changed, missing or extra file is a DamagedCheckpoint naming it. Every process checks all the items' files
        (it reads its shards from several of them). A step saved before checksums (no `checksums` in its meta)
        restores unverified, as it did then."""
        if "checksums" not in meta:
            return
        step_dir = self._step_dir(step)

        def damaged(reason):
            return DamagedCheckpoint(f"checkpoint {step_dir} is damaged ({reason})", reason)

        try:
            with open(os.path.join(step_dir, CHECKSUMS_FILE)) as f:
                recorded = json.load(f)
            expected = {path: value for path, value in recorded.items() if path.split("/")[0] in items}
            actual = {path: file_checksum(os.path.join(step_dir, path), meta["checksums"])
                      for path in _item_files(step_dir, items)}
        except FileNotFoundError:
            raise damaged(f"{CHECKSUMS_FILE}: missing") from None
        except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, not a dict, unknown hash
            raise damaged(f"{CHECKSUMS_FILE}: {type(e).__name__}: {e}") from None
        for path in sorted(expected.keys() | actual.keys()):
            if path not in actual:
                raise damaged(f"{path}: missing")
            if expected.get(path) != actual[path]:
                raise damaged(f"{path}: " + ("checksum mismatch" if path in expected else f"not in {CHECKSUMS_FILE}"))

    def _restore_item(self, step, name, args):
        """One item of a step (meta, model or optim); any failure of orbax or TensorStore reading it means a
        damaged file, reported in one line."""
        try:
            with _reads_finish_before_loop_close():
                return getattr(self.manager.restore(step, args=ocp.args.Composite(**{name: args})), name)
        except Exception as e:  # orbax and TensorStore raise many kinds of errors for a damaged file
            reason = f"{name}: {_short_reason(e, self._step_dir(step))}"
            raise DamagedCheckpoint(f"checkpoint {self._step_dir(step)} is damaged ({reason})", reason) from None

    def _restore_state(self, step, name, abstract_state):
        """Item `name` into a copy of `abstract_state`, sharded by its logical names on the current mesh."""
        pure, mesh = _pure(abstract_state), jax.sharding.get_mesh()
        if mesh.empty:
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), pure)
        else:
            shardings = _pure(sharding.state_shardings(abstract_state, mesh))
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, shardings)
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy: replace_by_pure_dict works in place
        nnx.replace_by_pure_dict(state, self._restore_item(step, name, ocp.args.StandardRestore(target)))
        return state


def file_checksum(path, algorithm):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _item_files(step_dir, items=None):
    """The paths (relative, "/"-separated) of every file under the step's item directories (`items`, default
    all). Not the files at the step's top: orbax's own step record, which it rewrites as it commits the step."""
    items = items or [d for d in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, d))]
    return [os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            for item in items for root, _, names in os.walk(os.path.join(step_dir, item)) for name in names]


def _move_aside(path):
    target, n = path + ".damaged", 1
    while os.path.exists(target):  # damaged before: keep both
        target, n = f"{path}.damaged{n}", n + 1
    os.rename(path, target)


def _describe_holder(text):
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
        return "holder unknown"


def _short_reason(e, step_dir):
    """The root error's first line, without the step's path (the message names it) and without orbax's wrapper,
    which prints the repr of a TensorStore method."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
    text = lines[0] if lines else ""
    if type(e) not in (ValueError, Exception):  # TensorStore's ValueErrors start with a status (NOT_FOUND: ...)
        text = f"{type(e).__name__}: {text}"
    text = text.split(" See full TensorStore details")[0].split(" [tensorstore_spec=")[0]
    text = text.replace(f' at local file "{step_dir}/', ' in "').replace(step_dir + "/", "")
    return text if len(text) <= 240 else text[:237] + "..."


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that, asked to close, first lets its pending tasks finish.

    orbax runs a restore on a fresh loop and closes it as soon as one read fails, while TensorStore is still
    completing the item's other reads on its own threads. Each of those then reports to the closed loop and
    prints a 'RuntimeError: Event loop is closed' traceback, at a moment that depends on timing (even at exit).
    Waiting for them before closing leaves nothing to report."""

    def close(self):
        pending = asyncio.all_tasks(self)
        if pending and not self.is_running() and not self.is_closed():
            self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _DrainingLoop()


@contextlib.contextmanager
def _reads_finish_before_loop_close():
    """Loops that orbax creates meanwhile (it calls asyncio.new_event_loop) are _DrainingLoops."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def _pure(state):
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def check_model_config(meta, config, where):
    saved = meta.get("model_config", {})
    mismatched = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items()
                  if k in saved and saved[k] != v and k not in EXECUTION_FIELDS}
    if mismatched:
        raise UserError(f"checkpoint {where} does not match the requested model: "
                        + ", ".join(f"{k} saved {a} vs requested {b}" for k, (a, b) in mismatched.items()))


def check_tokenizer(meta, tokenizer, where, tokenizer_dir=None):
    """Refuse a tokenizer that the checkpoint `where` was not trained with: a fingerprint other than the one its
    meta records, or a vocabulary size other than its model's.
    `tokenizer_dir`: where the tokenizer came from, for the message (default: $JAXCHAT_BASE_DIR/tokenizer)."""
    tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    saved, actual = meta.get("tokenizer_fingerprint"), tokenizer.fingerprint()
    if saved != actual:
        raise UserError(f"the tokenizer at {tokenizer_dir} is not the one {where} was trained with (fingerprint "
                        f"{actual} vs {saved}): was it retrained or replaced? Use the tokenizer the model was "
                        f"trained with, or train the model again")
    vocab_size = meta["model_config"]["vocab_size"]
    if vocab_size != tokenizer.get_vocab_size():
        raise UserError(f"the tokenizer at {tokenizer_dir} has {tokenizer.get_vocab_size()} tokens but the model of "
                        f"{where} has a vocabulary of {vocab_size}: use the tokenizer the model was trained with")
    # the BOS token needs no check: a tokenizer cannot be built without one (RustBPETokenizer.__init__)


def load_model(source, model_tag=None, step=None, **execution):
    """nanochat's load_model: a stage's model (tag: the largest d<N>; step: the last), the tokenizer it was trained
    with (the checkpoint's copy), checked against it, and the meta. Returns (model, tokenizer, meta); the weights
    land on the mesh set by `jax.set_mesh`.
    `execution`: GPTConfig execution fields (compute_dtype=..., remat=...) to use instead of the saved ones."""
    directory, model_tag = run_dir(source, model_tag)
    with Checkpointer(directory, max_to_keep=None, create=False) as ckpt:
        meta = ckpt.restore_meta(step)
        tokenizer = ckpt.load_tokenizer(meta, f"{source}/{model_tag} step {meta['step']}")
        config = GPTConfig(**meta["model_config"]).with_execution(**execution)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
        model_state, _, meta = ckpt.restore(meta["step"], abstract)
    return nnx.merge(graphdef, model_state), tokenizer, {**meta, "model_tag": model_tag}
