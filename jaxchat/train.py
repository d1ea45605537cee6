"""The train state and the pure, jitted train step.

    with jax.set_mesh(mesh):
        state = init_train_state(model_config, OptimConfig())
        state, metrics = train_step(state, sharding.shard_batch(batch, batch_axis=1), hyperparams(lrm, mom))

`batch` = {"inputs", "targets"}: int32 (accum, B, T); targets −1 are not supervised. The step scans over the
accum micro-batches, sums token losses and gradients, and divides once by the supervised tokens of the whole
step, so micro-batches weigh by their token counts and one with none adds exactly 0.
"""

import math
from functools import cache, partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxchat import sharding
from jaxchat.model import GPT
from jaxchat.optim import OptimConfig, build_optimizer


@struct.dataclass
class TrainState:
    """A model and its optimizer as one pytree: their NNX graphs are static, their arrays are the leaves.
    `params`: the model's parameters; `opt_state`: the optimizer's (Adam moments, Muon momentum, step count)."""
    model_graph: nnx.GraphDef = struct.field(pytree_node=False)
    optimizer_graph: nnx.GraphDef = struct.field(pytree_node=False)
    params: nnx.State
    opt_state: nnx.State

    @classmethod
    def create(cls, model, optimizer):
        (model_graph, params), (optimizer_graph, opt_state) = nnx.split(model), nnx.split(optimizer)
        return cls(model_graph, optimizer_graph, params, opt_state)

    @property
    def model(self):
        """A GPT viewing this state's parameters (invalid once the state is donated to `train_step`)."""
        return nnx.merge(self.model_graph, self.params)

    @property
    def eval_model(self):
        """`model` computed without fp8, as evaluations, sampling and saved configs want it (nanochat's
        disable_fp8): the same parameters, only the execution field differs."""
        config = self.model.config
        return nnx.merge(model_graph(config.with_execution(fp8=False)), self.params) if config.fp8 else self.model

    @property
    def optimizer(self):
        return nnx.merge(self.optimizer_graph, self.opt_state)


@cache
def model_graph(config):
    """The graph of a GPT of `config` (its structure and static fields, no arrays)."""
    return nnx.graphdef(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))


def model_and_optimizer(model_config, optim_config=OptimConfig(), seed=0):
    """A function building (model, optimizer): called for a fresh state, or under nnx.eval_shape for a restore."""
    tx = build_optimizer(model_config.n_embd, optim_config)

    def make():
        model = GPT(model_config, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return make


def init_train_state(model_config, optim_config=OptimConfig(), seed=0):
    """Fresh model and optimizer; under a mesh (`jax.set_mesh`), every array is created directly in its shard."""
    return TrainState.create(*sharding.create_sharded(model_and_optimizer(model_config, optim_config, seed)))


def abstract_train_state(model_config, optim_config=OptimConfig(), seed=0):
    """The TrainState's shapes and dtypes, no arrays: the target a checkpoint is restored into."""
    return TrainState.create(*nnx.eval_shape(model_and_optimizer(model_config, optim_config, seed)))


@partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch, hyper):
    """One optimizer step over `accum` micro-batches. `hyper`: {"lr_multiplier", "muon_momentum"} scalars.
    Returns the new state and device-array metrics {loss, grad_norm, num_tokens} (loss = mean over the step's
    supervised tokens; grad_norm before clipping). An optional batch["weights"] (accum, B, T) fp32 scales each
    token's loss. RL: weights = advantages, so Σ adv·CE / N = −Σ adv·logp / N is nanochat's token-level
    policy-gradient loss (−objective), normalised by the step's supervised (sampled) tokens."""
    model, opt = state.model, state.optimizer
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_sum(params, inputs, targets, weights):
        return nnx.merge(graphdef, params, rest).loss(inputs, targets, weights, reduction="sum")

    def micro_step(carry, micro_batch):
        grads, total = carry
        # No "weights" key (pretraining, SFT): None, so the graph holds no weights array.
        loss, g = jax.value_and_grad(loss_sum)(params, micro_batch["inputs"], micro_batch["targets"],
                                               micro_batch.get("weights"))
        return (jax.tree.map(jnp.add, grads, g), total + loss), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, total), _ = jax.lax.scan(micro_step, (zeros, jnp.float32(0)), batch)
    num_tokens = jnp.sum(batch["targets"] != -1)
    scale = 1.0 / jnp.maximum(num_tokens, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g * scale, grads)
    grad_norm = optax.tree.norm(grads)
    opt.update(model, grads, **hyper)
    metrics = {"loss": total * scale, "grad_norm": grad_norm, "num_tokens": num_tokens}
    return state.replace(params=sharding.constrain_state(nnx.state(model)),
                         opt_state=sharding.constrain_state(nnx.state(opt))), metrics


def check_finite(loss, step):
    """Fetch the loss and stop training if it is NaN/inf: never silently continue."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss ({value}) at step {step}: stopping training")
    return value
