"""What the chat stages (mid_train, chat_sft, chat_rl) share: their common flags, and `StageRun`, which starts from
the previous stage's checkpoint (its weights, a fresh optimizer) or resumes the stage's own run exactly, saves
checkpoints (model, optimizer, data position, loop state) and logs to TensorBoard.
"""
import dataclasses
import json
import os

import jax
from flax import nnx

from jaxchat import sharding
from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir, find_largest_model, load_model
from jaxchat.common import UserError, get_base_dir
from jaxchat.model import GPTConfig
from jaxchat.optim import OptimConfig
from jaxchat.tensorboard import SummaryWriter
from jaxchat.train import TrainState, init_train_state, model_and_optimizer

# settings a resumed run must share with the run it continues
RESUME_KEYS = ("source", "model_step", "dtype", "num_iterations", "embedding_lr", "unembedding_lr", "matrix_lr",
               "weight_decay", "init_lr_frac", "rows")


def flag_adder(p):
    """add(name, ...) registers --name-with-dashes and --name_with_underscores (nanochat's scripts take both)."""
    return lambda name, **kw: p.add_argument(f"--{name.replace('_', '-')}", f"--{name}", **kw)


def add_flags(p, source, **defaults):
    """The flags every chat stage has (nanochat's names), `defaults` overriding some."""
    d = {"device_batch_size": 4, "init_lr_frac": 1.0, "eval_every": 100, **defaults}
    add = flag_adder(p)
    add("source", default=source, choices=["base", "mid", "sft", "rl"], help="the checkpoints to start from")
    add("model_tag", default="", help="model tag to start from and to save as (default: the source's largest d<N>)")
    add("model_step", type=int, default=-1, help="the source's step (default: its last)")
    add("dtype", default="float32", choices=["float32", "bfloat16"], help="matmul dtype (params stay fp32)")
    add("mesh_data", type=int, default=1, help="size of the mesh's data axis; the rest of the devices go to fsdp")
    add("device_batch_size", type=int, default=d["device_batch_size"], help="rows per device per micro-batch")
    add("num_iterations", type=int, default=-1, help="steps (default: one pass over the data mixture)")
    add("embedding_lr", type=float, default=0.2)
    add("unembedding_lr", type=float, default=0.004)
    add("matrix_lr", type=float, default=0.02)
    add("weight_decay", type=float, default=0.0)
    add("init_lr_frac", type=float, default=d["init_lr_frac"], help="every learning rate × this")
    add("eval_every", type=int, default=d["eval_every"])
    add("save_every", type=int, default=-1, help="-1: only at the end")
    add("keep", type=int, default=2, help="checkpoints kept")
    add("resume", type=int, default=0, help="1: continue this stage's latest checkpoint of this model tag")
    add("overwrite", type=int, default=0, help="1: a fresh run may replace this model tag's old checkpoints")
    add("run", default="", help="TensorBoard run name")
    add("seed", type=int, default=0)
    return p


class StageRun:
    """`run.state` (TrainState), `run.step`, `run.loader_state`, `run.loop` (dict saved with checkpoints)."""

    def __init__(self, stage, args, mesh, loop_defaults, rows):
        self.stage, self.args, self.mesh, self.rows = stage, args, mesh, rows
        self.optim_config = OptimConfig(embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
        source_root = os.path.dirname(checkpoint_dir(args.source, "x"))
        self.model_tag = args.model_tag or find_largest_model(source_root)
        self.ckpt = Checkpointer(checkpoint_dir(stage, self.model_tag), max_to_keep=args.keep)
        self.step, self.loader_state, self.loop = 0, None, dict(loop_defaults)
        if args.resume:
            self._resume()
        else:
            self._start()
        self.config = self.state.model.config
        self.writer = SummaryWriter(os.path.join(get_base_dir(), "runs", args.run or f"{stage}_{self.model_tag}"))

    def _start(self):
        if self.ckpt.all_steps() and not self.args.overwrite:
            raise UserError(f"{self.ckpt.directory} already holds checkpoints (steps {self.ckpt.all_steps()}): "
                            f"--resume=1 continues that run, --overwrite=1 replaces it, --model_tag=NAME starts another")
        for old in self.ckpt.all_steps():
            self.ckpt.manager.delete(old)
        step = None if self.args.model_step < 0 else self.args.model_step
        source, meta = load_model(self.args.source, self.model_tag, step, self.mesh, compute_dtype=self.args.dtype)
        self.source_step = meta["step"]
        state = init_train_state(source.config, self.optim_config, self.mesh, self.args.seed)
        state.state[0] = nnx.state(source)  # the source's weights, a fresh optimizer
        self.state = state

    def _resume(self):
        if self.ckpt.latest_step() is None:
            raise UserError(f"--resume: no checkpoint to resume in {self.ckpt.directory}")
        meta = self.ckpt.restore_meta()
        saved = {**meta["user_config"], "rows": meta["rows"]}
        now = {**vars(self.args), "rows": self.rows}
        if changed := {k: (saved.get(k), now[k]) for k in RESUME_KEYS if saved.get(k) != now[k]}:
            raise UserError(f"--resume: {self.ckpt.directory} was trained with other settings: " + ", ".join(
                f"{k} saved {a} vs now {b}" for k, (a, b) in changed.items()) + " (resume with the same ones)")
        config = GPTConfig(**{**meta["model_config"], "compute_dtype": self.args.dtype})
        graphdef, abstract = nnx.split(nnx.eval_shape(model_and_optimizer(config, self.optim_config, self.args.seed)))
        model_state, optim_state, meta = self.ckpt.restore(meta["step"], abstract[0], abstract[1], mesh=self.mesh)
        self.state = TrainState(graphdef, nnx.State({0: model_state, 1: optim_state}))
        self.step, self.loader_state, self.loop = meta["step"], meta["loader_state"], meta["loop"]
        self.source_step = meta["source_step"]

    def save(self, step, loader_state):
        meta = {"model_config": dataclasses.asdict(self.config), "user_config": vars(self.args), "rows": self.rows,
                "loader_state": loader_state, "loop": self.loop, "source_step": self.source_step}
        self.ckpt.save(step, self.state.state[0], self.state.state[1], json.loads(json.dumps(meta)))

    def close(self):
        self.ckpt.close()
        self.writer.close()


def source_config(args):
    """The model config (a dict) of the checkpoint a stage starts from, read from its metadata only."""
    root = os.path.dirname(checkpoint_dir(args.source, "x"))
    tag = args.model_tag or find_largest_model(root)
    return Checkpointer(os.path.join(root, tag), create=False).restore_meta()["model_config"]


def make_mesh(args):
    try:
        return sharding.make_mesh((args.mesh_data, -1))
    except ValueError as e:
        raise UserError(f"--mesh_data={args.mesh_data}: {e}") from None


def batch_shape(args, mesh, examples_per_step):
    """(rows per micro-batch, micro-batches per step) for a step of `examples_per_step` rows."""
    rows = args.device_batch_size * mesh.devices.size
    accum, rem = divmod(examples_per_step, rows)
    if accum < 1 or rem:
        raise UserError(f"{examples_per_step} examples per step must be a multiple of device_batch_size × devices = "
                        f"{args.device_batch_size} × {mesh.devices.size}")
    return rows, accum


def devices_line(mesh):
    return f"{jax.default_backend()} × {mesh.devices.size} ({jax.devices()[0].device_kind}), mesh {dict(mesh.shape)}"
