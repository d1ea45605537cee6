"""Checkpoints: a stage's whole state saved with orbax, restored exactly, onto any mesh.

Layout (nanochat's, one directory per step instead of three files):

    $JAXCHAT_BASE_DIR/{base,mid,chatsft,chatrl}_checkpoints/<model_tag>/<step:06d>/
        model/  the parameters (fp32): all that a later stage, an eval or the engine needs
        optim/  the optimizer state (Adam moments, Muon momentum, step count)
        meta/   JSON: step, model_config, user_config, data-loader state, loop state, metrics

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-write never damages
an earlier checkpoint; at most `max_to_keep` are kept. Restoring takes the shardings of the *current* mesh, so a
checkpoint saved on one mesh shape loads onto another (orbax re-shards).
"""
import dataclasses
import os
import re

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxchat import sharding
from jaxchat.common import UserError, get_base_dir
from jaxchat.model import GPT, GPTConfig

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}


def checkpoint_dir(source, model_tag):
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}; sources: {', '.join(SOURCE_DIRS)}")
    return os.path.join(get_base_dir(), SOURCE_DIRS[source], model_tag)


def find_largest_model(checkpoints_dir):
    """nanochat's default model tag: the largest d<N> present (else the most recently written tag)."""
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise UserError(f"no checkpoints in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


class Checkpointer:
    """Save/restore the steps of one run directory. Saves are asynchronous: call `wait()` before exiting."""

    def __init__(self, directory, max_to_keep=2, create=True):
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise UserError(f"no checkpoint directory {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, step_format_fixed_length=6)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step, model_state, optim_state, meta):
        """model_state/optim_state: NNX states (or pure dicts) of the model and the optimizer; meta: JSON-able."""
        saved = self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(_pure(model_state)), optim=ocp.args.StandardSave(_pure(optim_state)),
            meta=ocp.args.JsonSave({**meta, "step": step})))
        if not saved:  # orbax declines (returns False) when a step at or after this one is already on disk
            raise UserError(f"checkpoint step {step} was not written to {self.directory} (steps there: "
                            f"{self.all_steps()})")

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise UserError(f"no checkpoint {'at step ' + str(step) if step is not None else ''} in {self.directory}"
                            f" (steps present: {self.all_steps() or 'none'})")
        return step

    def restore_meta(self, step=None):
        step = self._step(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many kinds for damaged files
            raise UserError(f"damaged checkpoint {self.directory}/{step:06d} (meta): {type(e).__name__}: {e}") from None

    def restore(self, step, abstract_model_state, abstract_optim_state=None, mesh=None):
        """Restore into the given abstract NNX states (shapes; shardings from `mesh` and the logical names).
        Returns (model_state, optim_state or None, meta)."""
        step = self._step(step)
        items = {"model": ocp.args.StandardRestore(_target(abstract_model_state, mesh)),
                 "meta": ocp.args.JsonRestore()}
        if abstract_optim_state is not None:
            items["optim"] = ocp.args.StandardRestore(_target(abstract_optim_state, mesh))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise UserError(f"cannot restore checkpoint {self.directory}/{step:06d}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}") from None
        model_state = _fill(abstract_model_state, restored.model)
        optim_state = _fill(abstract_optim_state, restored.optim) if abstract_optim_state is not None else None
        return model_state, optim_state, restored.meta


def _pure(state):
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def _target(abstract_state, mesh):
    """ShapeDtypeStructs carrying the shardings the arrays should land with (on the concrete mesh)."""
    pure = _pure(abstract_state)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), pure)
    shardings = _pure(sharding.state_shardings(abstract_state, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, shardings)


def _fill(abstract_state, pure):
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy: replace_by_pure_dict works in place
    nnx.replace_by_pure_dict(state, pure)
    return state


def check_model_config(meta, config, where):
    saved = meta.get("model_config", {})
    mismatched = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items()
                  if k in saved and saved[k] != v and k != "compute_dtype"}
    if mismatched:
        raise UserError(f"checkpoint {where} does not match the requested model: "
                        + ", ".join(f"{k} saved {a} vs requested {b}" for k, (a, b) in mismatched.items()))


def load_model(source, model_tag=None, step=None, mesh=None, compute_dtype=None):
    """nanochat's load_model: the model of a stage's checkpoint (model tag: the largest d<N>; step: the last).
    Returns (model, meta); weights land sharded on `mesh` (or on one device)."""
    root = os.path.dirname(checkpoint_dir(source, "x"))
    model_tag = model_tag or find_largest_model(root)
    ckpt = Checkpointer(os.path.join(root, model_tag), max_to_keep=None, create=False)
    meta = ckpt.restore_meta(step)
    config = GPTConfig(**{**meta["model_config"], **({"compute_dtype": compute_dtype} if compute_dtype else {})})
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    model_state, _, meta = ckpt.restore(meta["step"], abstract, mesh=mesh)
    return nnx.merge(graphdef, model_state), {**meta, "model_tag": model_tag}
