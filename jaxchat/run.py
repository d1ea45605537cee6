"""The scaffold of the four training stages (base_train, mid_train, chat_sft, chat_rl): one run of a stage.

    with TrainingRun("base", model_tag, args, settings, loop_state, optim=optim, resume_keys=RESUME_KEYS,
                     fresh=lambda: (init_train_state(config, optim), tok, {}), model_config=config, tokenizer=tok) as run:
        loader = ...(state=run.dataloader_state_dict)
        for step in run.steps(num_iterations, loader.get_state):   # saves when due, and the last step
            if run.last or run.due(args.eval_every):   # due: every N steps and at the last (-1: never)
                ... evaluate ...
            if run.last:
                break
            run.state, metrics = train_step(run.state, batch, hyper)
            run.log(step, metrics, tokens, {"train/lrm": lrm})    # logged one step late

A run owns its checkpoint directory `<stage>_checkpoints/<model_tag>/` while it lives (a second run on the same tag
is refused). Fresh: a directory that already holds checkpoints is replaced only with --overwrite=1. Resumed
(--resume=1): the settings that shape the run must equal the saved ones, and the state, the data position and the
loop state continue from the newest intact checkpoint, so the resumed run is the uninterrupted one; a run whose last
step is saved (`final=True`) is finished: resumed, it says so and the stage returns None (`RunFinished`, caught by
`stage_main`). A checkpoint holds the run as it stands before the evaluations of its step, which a resumed run does
again, and a crash in the final evaluation loses nothing. Meta keys are nanochat's: `model_config`, `user_config`,
`device_batch_size`, `max_seq_len`, `dataloader_state_dict`, `loop_state` (`smooth_train_loss`, `min_val_bpb`,
`total_training_time`, ...).
"""
import dataclasses
import glob
import json
import os
import time

import jax
from flax import nnx
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

from jaxchat import distributed, sharding
from jaxchat.checkpoint_manager import (Checkpointer, check_model_config, check_tokenizer, checkpoint_dir, load_model,
                                        run_dir)
from jaxchat.common import (SWITCH, UserError, count_or_unset, flag_adder, get_base_dir, non_negative_float,
                            positive_int, random_seed, step_or_last)
from jaxchat.hardware import peak_memory
from jaxchat.model import REMAT, GPTConfig
from jaxchat.optim import OptimConfig, batch_lr_scale
from jaxchat.report_card import get_report
from jaxchat.train import abstract_train_state, check_finite, init_train_state

EMA_BETA = 0.9  # smoothing of the logged training loss (nanochat's)
COMPILE_STEPS = 10  # the first steps of a process include compilation: not in the training time (nanochat: step > 10)
# the loop state every run keeps (beside the stage's own): the EMA of the loss, and the time of the timed steps
RUN_LOOP_STATE = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "timed_steps": 0}
NANOCHAT_EVAL_TOKENS = 20 * 524288  # val tokens per evaluation in nanochat's runs
# flags a resumed chat stage must share with the run it continues
CHAT_RESUME_KEYS = ("source", "model_step", "dtype", "num_iterations", "embedding_lr", "unembedding_lr", "matrix_lr",
                    "weight_decay", "init_lr_frac")


def add_training_flags(p, **defaults):
    """The flags every training stage has (nanochat's names); `defaults` overrides some of their defaults."""
    d = {"device_batch_size": 32, "eval_every": 250, **defaults}
    add = flag_adder(p)
    add("model_tag", default="", help="checkpoint directory name")
    add("dtype", default="float32", choices=["float32", "bfloat16"], help="matmul dtype (params stay fp32)")
    add("remat", default="none", choices=list(REMAT), help="what each block's backward recomputes (less memory)")
    add("scan_layers", **SWITCH, default=0, help="1: the blocks under one lax.scan (faster compile)")
    add("fp8", **SWITCH, default=0, help="1: train the large matmuls in fp8 (Hopper GPUs; needs --dtype=bfloat16); "
                                         "evaluations stay bf16")
    add("mesh_data", type=positive_int, default=1,
        help="size of the mesh's data axis; the rest of the devices go to fsdp")
    add("device_batch_size", type=positive_int, default=d["device_batch_size"], help="rows per device per micro-batch")
    add("num_iterations", type=count_or_unset, default=-1, help="optimizer steps (-1: the stage's default horizon)")
    add("embedding_lr", type=non_negative_float, default=0.2)
    add("unembedding_lr", type=non_negative_float, default=0.004)
    add("matrix_lr", type=non_negative_float, default=0.02)
    add("weight_decay", type=non_negative_float, default=0.0)
    add("eval_every", type=count_or_unset, default=d["eval_every"], help="-1: never")
    add("save_every", type=count_or_unset, default=-1, help="-1: only at the end")
    add("keep", type=positive_int, default=2, help="checkpoints kept")
    add("resume", **SWITCH, default=0, help="1: continue this stage's latest checkpoint of this model tag")
    add("overwrite", **SWITCH, default=0, help="1: a fresh run may replace this model tag's old checkpoints")
    add("run", default="", help="TensorBoard run name (default: <stage>_<model_tag>)")
    add("seed", type=random_seed, default=0)
    return add


def add_chat_flags(p, source, **defaults):
    """The training flags plus what the chat stages (mid, SFT, RL) share: where they start from."""
    add = add_training_flags(p, **defaults)
    add("source", default=source, choices=["base", "mid", "sft", "rl"], help="the checkpoints to start from")
    add("model_step", type=step_or_last, default=-1, help="the source's step (default: its last)")
    add("init_lr_frac", type=non_negative_float, default=defaults.get("init_lr_frac", 1.0),
        help="every learning rate × this")
    return add


def source_config(args):
    """The model config (a dict) of the checkpoint a chat stage starts from, read from its metadata only."""
    with Checkpointer(run_dir(args.source, args.model_tag)[0], create=False) as ckpt:
        return ckpt.restore_meta()["model_config"]


def eval_tokens(requested, total_batch_size, num_iterations):
    """Val tokens per evaluation: `requested` when > 0, else a tenth of the run's tokens (at least one step's,
    at most nanochat's): an evaluation never costs more than a small part of a short run."""
    if requested > 0:
        return requested
    if num_iterations <= 0:
        return NANOCHAT_EVAL_TOKENS
    return min(NANOCHAT_EVAL_TOKENS, max(total_batch_size, num_iterations * total_batch_size // 10))


def model_execution(args):
    """The model's execution fields (how to compute it: dtype, remat, scan, fp8) from a training stage's flags."""
    if args.fp8 and args.dtype != "bfloat16":
        raise UserError(f"--fp8=1 needs --dtype=bfloat16 (fp8 matmuls take bf16 activations), not --dtype={args.dtype}")
    return {"compute_dtype": args.dtype, "remat": args.remat, "scan_layers": bool(args.scan_layers),
            "fp8": bool(args.fp8)}


def optim_config(args):
    """The OptimConfig of a training stage's flags. base_train picks nanochat's recipe (--optimizer; 2026 scales
    every LR by √(B/2¹⁹), its batch rule) and the clipping; the chat stages train with October's."""
    recipe = getattr(args, "optimizer", "2025")
    fields = dict(embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr,
                  weight_decay=args.weight_decay)
    if recipe == "2026":
        fields.update(scalar_lr=args.scalar_lr, batch_lr_scale=batch_lr_scale(args.total_batch_size))
    if getattr(args, "grad_clip", None) is not None:
        fields["grad_clip"] = args.grad_clip
    return OptimConfig.recipe(recipe, **fields)


def make_mesh(args, devices=None):
    """The ("data", "fsdp") mesh of `devices` (default: all) from --mesh_data; a shape that does not fit is one
    error line."""
    try:
        return sharding.make_mesh((args.mesh_data, -1), devices=devices)
    except ValueError as e:
        raise UserError(f"--mesh_data={args.mesh_data}: {e}") from None


def batch_rows(args, per_step, row_len=1, device_count=None):
    """(rows per micro-batch over `device_count` devices (default: all), micro-batches per step) for a step of
    `per_step` rows, or of `per_step` tokens in rows of `row_len`."""
    n = device_count or jax.device_count()
    rows = args.device_batch_size * n
    accum, rem = divmod(per_step, rows * row_len)
    if accum < 1 or rem:
        unit = f"tokens per step must be a multiple of device_batch_size × row length × devices = " \
               f"{args.device_batch_size} × {row_len} × {n}" if row_len > 1 else \
               f"rows per step must be a multiple of device_batch_size × devices = {args.device_batch_size} × {n}"
        raise UserError(f"{per_step} {unit}")
    return rows, accum


def devices_line():
    mesh = jax.sharding.get_mesh()
    hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    kind = jax.devices()[0].device_kind
    return f"{jax.default_backend()} × {jax.device_count()} ({kind}){hosts}, mesh {dict(mesh.shape)}"


class RunFinished(Exception):
    """A run resumed (--resume=1) from its final checkpoint: the stage has nothing to do."""


def stage_main(build_parser, train, argv):
    """A training stage's `main`: its flags, then `train(args)` under the mesh of --mesh_data. A finished run
    resumed says so and returns None (a pipeline resumed with --resume=1 goes on to its next stage)."""
    args = build_parser().parse_args(argv)
    with jax.set_mesh(make_mesh(args)):
        try:
            return train(args)
        except RunFinished as e:
            print(e)
            return None


def chat_run(stage, args, settings, loop_state, resume_keys=()):
    """The TrainingRun of a chat stage. Fresh, it starts from the source stage's checkpoint (its weights and its
    tokenizer, a fresh optimizer); `run.meta["source_step"]` names the step it started from. `resume_keys`: the
    stage's own flags a resumed run must share (beside CHAT_RESUME_KEYS)."""
    model_tag = run_dir(args.source, args.model_tag)[1]
    optim = optim_config(args)

    def fresh():
        step = None if args.model_step < 0 else args.model_step
        model, tokenizer, meta = load_model(args.source, model_tag, step, **model_execution(args))
        state = init_train_state(model.config, optim, args.seed)
        return state.replace(params=nnx.state(model)), tokenizer, {"source_step": meta["step"]}

    return TrainingRun(stage, model_tag, args, settings, loop_state, optim=optim,
                       resume_keys=CHAT_RESUME_KEYS + tuple(resume_keys), fresh=fresh)


class SummaryWriter:
    """TensorBoard scalars and text without TensorFlow (tensorboard's own event-file writer, as torch uses):
    `writer.scalars(step, {"train/loss": 3.2})`; view with `tensorboard --logdir $JAXCHAT_BASE_DIR/runs`.
    A stage's event files end in `.<stage>` (`files` is their pattern), so that stages sharing a run name (`--run`)
    keep their curves apart. fresh: a new run of the stage replaces the curves its earlier run left in `logdir` (as
    it replaces its checkpoints); a resumed run adds to them."""

    def __init__(self, logdir, stage="", fresh=False):
        suffix = f".{stage}" if stage else ""
        self.files = os.path.join(logdir, "events.out.tfevents.*" + suffix)
        self.writer = None
        if distributed.is_writer():  # process 0 logs for all
            for old in glob.glob(self.files) if fresh else ():
                os.remove(old)
            self.writer = EventFileWriter(logdir, filename_suffix=suffix)

    def scalars(self, step, values):
        if self.writer is None:
            return
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self.writer.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=summary))

    def text(self, step, tag, text):
        if self.writer is None:
            return
        from tensorboard.plugins.text.summary_v2 import text_pb
        self.writer.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=text_pb(tag, text)))

    def close(self):
        if self.writer is not None:
            self.writer.close()


class TrainingRun:
    """`run.state` (TrainState), `run.tokenizer`, `run.step` (the step the loop is at), `run.dataloader_state_dict`
    (None when fresh), `run.loop_state` (saved with every checkpoint), `run.meta` (the stage's own meta keys, e.g.
    a chat stage's `source_step`: saved with every checkpoint, and on resume the whole saved meta), `run.writer`,
    `run.losses` ({step: loss} of this invocation), `run.train_loss` (the last one logged, smoothed), `run.last`
    (the loop is at the run's last step).

    stage: "base" | "mid" | "sft" | "rl". settings: what shapes a step, saved as top-level meta keys
    (device_batch_size, max_seq_len, total_batch_size, ...). resume_keys: the flags a resumed run must share with
    the saved run (with every key of `settings`); `predates` gives the value of a resume key that a run saved
    before the flag existed had. optim: the OptimConfig (a resumed state gets its optimizer).
    fresh(): (TrainState, tokenizer, the stage's own meta keys) of a new run.
    Resumed from the final checkpoint of a finished run, it raises RunFinished: the stage has nothing to do.
    On resume the model config comes from the checkpoint (checked against `model_config` when given) and the
    tokenizer from the run's own copy (checked against `tokenizer` when given)."""

    def __init__(self, stage, model_tag, args, settings, loop_state, *, optim, resume_keys, fresh, model_config=None,
                 tokenizer=None, predates=None):
        self.stage, self.model_tag, self.args, self.settings = stage, model_tag, args, settings
        self.predates = predates or {}  # flags newer than some checkpoints: {flag: the value those runs had}
        self.ckpt = Checkpointer(checkpoint_dir(stage, model_tag), max_to_keep=args.keep)
        self.ckpt.lock()
        try:
            if args.resume:
                self._resume(optim, resume_keys, model_config, tokenizer, loop_state)
            else:
                self._start(fresh, loop_state)
        except BaseException:
            self.ckpt.close()
            raise
        self.writer = SummaryWriter(os.path.join(get_base_dir(), "runs", args.run or f"{stage}_{model_tag}"), stage,
                                    fresh=not args.resume)
        self.start_step, self.started = self.step, time.time()
        self.losses, self.train_loss, self.last, self.bar, self.peak_flops = {}, None, False, None, None
        self._pending, self._mark = None, 0.0  # the step whose metrics are not logged yet; when its time started

    def _start(self, fresh, loop_state):
        if steps := self.ckpt.agreed_steps():
            if not self.args.overwrite:
                raise UserError(f"{self.ckpt.directory} already holds checkpoints (steps {steps}): --resume=1 "
                                f"continues that run, --overwrite=1 replaces it, --model_tag=NAME starts another")
            self.ckpt.clear()
        self.state, self.tokenizer, self.meta = fresh()
        self.step, self.dataloader_state_dict, self.loop_state = 0, None, {**RUN_LOOP_STATE, **loop_state}

    def _resume(self, optim, resume_keys, model_config, tokenizer, loop_state):
        saved = self.ckpt.newest_meta()
        if "user_config" not in saved:  # weights only (`jaxchat.hf import`): no optimizer, data position or flags
            raise UserError(f"--resume: {self.ckpt.directory} holds weights only, no run to resume; start a run from "
                            f"it with --source and --model_tag instead")
        if model_config is not None:
            check_model_config(saved, model_config, self.ckpt.directory)
        now = {**vars(self.args), **self.settings}
        was = {**self.predates, **saved["user_config"], **{k: saved.get(k) for k in self.settings}}
        if changed := {k: (was.get(k), now[k]) for k in (*resume_keys, *self.settings) if was.get(k) != now[k]}:
            raise UserError(f"--resume: {self.ckpt.directory} was trained with other settings: " + ", ".join(
                f"{k} saved {a} vs now {b}" for k, (a, b) in changed.items()) + " (resume with the same ones)")
        self.tokenizer = self.ckpt.load_tokenizer(saved, self.ckpt.directory)
        if tokenizer is not None:  # the stage's own (base_train: $JAXCHAT_BASE_DIR/tokenizer) must be the run's
            check_tokenizer(saved, tokenizer, self.ckpt.directory)
        config = GPTConfig(**saved["model_config"]).with_execution(**model_execution(self.args))
        abstract = abstract_train_state(config, optim, self.args.seed)
        params, opt_state, meta = self.ckpt.restore_latest(abstract.params, abstract.opt_state)
        self.state = abstract.replace(params=params, opt_state=opt_state)
        self.step, self.dataloader_state_dict, self.loop_state = \
            meta["step"], meta["dataloader_state_dict"], {**RUN_LOOP_STATE, **loop_state, **meta["loop_state"]}
        self.meta = meta
        # restored (so verified) before it is believed: a damaged final step is resumed from an earlier one instead
        if meta.get("finished"):
            raise RunFinished(f"{self.ckpt.directory}: this run finished at step {self.step}; nothing to resume "
                              f"(--overwrite=1 trains it again, --model_tag=NAME starts another)")

    @property
    def model(self):
        """The model the stage evaluates, samples from and saves the config of: the state's, without fp8."""
        return self.state.eval_model

    def steps(self, last, data_state, flops_per_token=None, peak_flops=None):
        """The stage's loop: yields each step from the run's next one to its last, that one with `run.last` set (at
        every step the stage evaluates what is due, then trains unless it is the last). Before a step is yielded,
        the run is saved with the data position `data_state()` when --save_every is due (not at the step it started
        from: that one is on disk) and always at the last step (final, before the final evaluation).
        last: the number of steps, or a function of the step saying whether the run has ended (one pass of data).
        flops_per_token, peak_flops (FLOP/s of all devices): to log the MFU."""
        ended = last if callable(last) else lambda step: step >= last
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.bar = tqdm(total=None if callable(last) else last, initial=self.step, unit="step",
                        desc=f"{self.stage} {self.model_tag}")
        while True:
            self.last = ended(self.step)
            if self.last or (self.step != self.start_step and self.due(self.args.save_every)):
                self._flush()
                self.save(self.step, data_state(), final=self.last)
            if self.last:
                self.bar.close()
            yield self.step
            if self.last:
                return
            self.step += 1

    def due(self, every):
        """Whether what the stage does every `every` steps (−1: never) is due at this step: at its multiples and at
        the last step. When it is, the previous step is logged first: what follows (an evaluation, a save) is in no
        step's time."""
        if every > 0 and (self.last or self.step % every == 0):
            self._flush()
            return True
        return False

    def log(self, step, metrics, tokens, scalars=None, postfix=""):
        """Log the step just dispatched (`train_step`'s device `metrics`), one step late: the host waits here for the
        previous step's result while this one runs, so it never stalls the device. tokens: what the step ran through
        the model (tok/s); scalars: the stage's own TensorBoard values (numbers or device scalars); postfix: its part
        of the progress bar. A step's time runs from the previous step's result to its own, or, after a pause (an
        evaluation, a save) or at the first step, from its dispatch."""
        if self._pending is None:
            self._mark = time.perf_counter()
        self._flush()
        self._pending = (step, metrics, tokens, scalars or {}, postfix)

    def _flush(self):
        if self._pending is None:
            return
        step, metrics, tokens, scalars, postfix = self._pending
        loss = self.losses[step] = check_finite(metrics["loss"], step)  # waits for the step
        now = time.perf_counter()
        dt, self._mark, self._pending = now - self._mark, now, None
        loop = self.loop_state
        loop["smooth_train_loss"] = EMA_BETA * loop["smooth_train_loss"] + (1 - EMA_BETA) * loss
        smooth = self.train_loss = loop["smooth_train_loss"] / (1 - EMA_BETA ** (step + 1))  # debiased (nanochat's)
        if step - self.start_step > COMPILE_STEPS:
            loop["total_training_time"] += dt
            loop["timed_steps"] += 1
        tok_s = tokens / dt
        values = {"train/loss": smooth, "train/dt": dt, "train/tok_per_sec": tok_s,
                  "total_training_time": loop["total_training_time"], **scalars}
        shown = [f"loss {smooth:.4f}", f"{tok_s:,.0f} tok/s"]
        if self.peak_flops:
            values["train/mfu"] = 100 * self.flops_per_token * tok_s / self.peak_flops
            shown.append(f"mfu {values['train/mfu']:.1f}%")
        self.writer.scalars(step, {k: float(v) for k, v in values.items()})
        self.bar.set_postfix_str(" | ".join(shown + ([postfix] if postfix else [])))
        self.bar.update(1)

    @property
    def seconds_per_step(self):
        """Training time per step over the timed steps of the whole run (None before any)."""
        return self.loop_state["total_training_time"] / self.loop_state["timed_steps"] \
            if self.loop_state["timed_steps"] else None

    def save(self, step, dataloader_state_dict, final=False):
        """Checkpoint the whole run at `step` (steps taken): model, optimizer, data position, loop state. final: the
        run's last step (a resume of it finds the run finished)."""
        meta = {**self.meta, "model_config": dataclasses.asdict(self.model.config), "user_config": vars(self.args),
                **self.settings, "dataloader_state_dict": dataloader_state_dict, "loop_state": self.loop_state,
                "finished": final}
        self.ckpt.save(step, self.state.params, self.state.opt_state, json.loads(json.dumps(meta)), self.tokenizer)

    def report(self, title, results):
        """Record this run in the report card: its flags, devices, wall time (this invocation) and peak memory,
        then the stage's `results`, and where its curves are."""
        label, gib = peak_memory()
        get_report().log(title, {"settings": vars(self.args), "devices": devices_line(),
                                 "wall time (s)": time.time() - self.started, f"{label} (GiB)": gib, **results,
                                 "tensorboard": self.writer.files})

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.ckpt.close()
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
