"""The train state and the pure, jitted train step.

    state = init_train_state(model_config, OptimConfig(), mesh)
    with jax.set_mesh(mesh):
        state, metrics = train_step(state, sharding.shard_batch(batch, mesh, batch_axis=1), hyperparams(lrm, mom))

`batch` = {"inputs", "targets"}: int32 (accum, B, T); targets −1 are not supervised. The step scans over the
accum micro-batches, sums token losses and gradients, and divides once by the supervised tokens of the whole
step, so micro-batches weigh by their token counts and one with none adds exactly 0.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxchat import sharding
from jaxchat.model import GPT
from jaxchat.optim import OptimConfig, build_optimizer


@struct.dataclass
class TrainState:
    """(model, nnx.Optimizer) as one pytree: the NNX graph is static, the arrays (params, Adam/Muon buffers,
    step) are the leaves."""
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    state: nnx.State

    @classmethod
    def create(cls, model, tx):
        return cls(*nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param))))

    @classmethod
    def from_objects(cls, model_and_optimizer):
        return cls(*nnx.split(model_and_optimizer))

    def merge(self):
        """(model, optimizer) objects viewing this state's arrays (invalid once the state is donated)."""
        return nnx.merge(self.graphdef, self.state)

    @property
    def model(self):
        return self.merge()[0]

    @property
    def step(self):
        return self.merge()[1].step[...]


def model_and_optimizer(model_config, optim_config=OptimConfig(), seed=0):
    """A function building (model, optimizer): called for a fresh state, or under nnx.eval_shape for a restore."""
    tx = build_optimizer(model_config.n_embd, optim_config)

    def make():
        model = GPT(model_config, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return make


def init_train_state(model_config, optim_config=OptimConfig(), mesh=None, seed=0):
    """Fresh model and optimizer; with a mesh, every array is created directly in its shard."""
    make = model_and_optimizer(model_config, optim_config, seed)
    return TrainState.from_objects(make() if mesh is None else sharding.create_sharded(make, mesh))


@partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch, hyper):
    """One optimizer step over `accum` micro-batches. `hyper`: {"lr_multiplier", "muon_momentum"} scalars.
    Returns the new state and device-array metrics {loss, grad_norm, num_tokens} (loss = mean over the step's
    supervised tokens; grad_norm before clipping). An optional batch["weights"] (accum, B, T) fp32 scales each
    token's loss. RL: weights = advantages, so Σ adv·CE / N = −Σ adv·logp / N is nanochat's token-level
    policy-gradient loss (−objective), normalised by the step's supervised (sampled) tokens."""
    model, opt = state.merge()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_sum(params, inputs, targets, weights):
        return nnx.merge(graphdef, params, rest)(inputs, targets, loss_reduction="sum", weights=weights)

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
    new_state = sharding.constrain_state(nnx.split((model, opt))[1])
    metrics = {"loss": total * scale, "grad_norm": grad_norm, "num_tokens": num_tokens}
    return state.replace(state=new_state), metrics


def check_finite(loss, step):
    """Fetch the loss and stop training if it is NaN/inf: never silently continue."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss ({value}) at step {step}: stopping training")
    return value
