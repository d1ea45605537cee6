"""Checks that need 8 (fake CPU) devices. XLA_FLAGS must be set before jax is imported, so tests run this file
in a fresh process (`_harness.run_checks`); it prints one JSON object {check name: result or {"error": traceback}}.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_multidevice.py [check ...]
"""

import json
import sys
import traceback

TINY = dict(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
MESHES = [(1, 8), (2, 4), (8, 1)]


def check_param_shardings():
    """Every parameter and optimizer buffer of a state built on a (1, 8) mesh is sharded as the table says, with
    the October optimizer and (its NorMuon state has a reduced axis of size 1) the 2026 one."""
    import jax
    from flax import nnx
    from jaxchat import sharding
    from jaxchat.model import GPTConfig
    from jaxchat.optim import OptimConfig
    from jaxchat.train import init_train_state

    mesh = sharding.make_mesh((1, 8))
    with jax.set_mesh(mesh):
        states = [init_train_state(GPTConfig(**TINY), optim) for optim in (OptimConfig(), OptimConfig.recipe("2026"))]
    is_var = lambda x: isinstance(x, nnx.Variable)
    mismatches, checked = [], 0
    arrays = [(state.params, state.opt_state) for state in states]
    for path, v in jax.tree_util.tree_flatten_with_path(arrays, is_leaf=is_var)[0]:
        want = nnx.get_named_sharding(v, mesh).get_value()  # as Flax resolves the logical names
        checked += 1
        if not v[...].sharding.is_equivalent_to(want, v[...].ndim):
            mismatches.append(f"{jax.tree_util.keystr(path)}: {v[...].sharding.spec} != {want.spec}")
    sharded_buffers = sum("fsdp" in str(v[...].sharding.spec) for v in jax.tree.leaves(arrays, is_leaf=is_var))
    with jax.set_mesh(sharding.make_mesh((2, 4))):
        batch_shards = sharding.batch_shards()
    return {"checked": checked, "mismatches": mismatches, "fsdp_sharded_arrays": sharded_buffers,
            "batch_shards": batch_shards}


def check_flax_specs():
    """Per parameter and optimizer buffer of a (model, optimizer) built on a (1, 8) mesh: its logical names, the
    spec and sharding Flax's own API reports (nnx.get_partition_spec, nnx.get_named_sharding, the same under an
    nnx.logical_axis_rules context, nnx.get_abstract_model) and the sharding jaxchat placed it with; and per
    parameter, jaxchat's table beside Flax's answer."""
    import jax
    from flax import nnx
    from jaxchat import sharding
    from jaxchat.model import GPTConfig
    from jaxchat.train import model_and_optimizer

    mesh = sharding.make_mesh((1, 8))
    make = model_and_optimizer(GPTConfig(**TINY))
    with jax.set_mesh(mesh):
        model, opt = sharding.create_sharded(make)
    state, params = nnx.state((model, opt)), nnx.state(model, nnx.Param)
    is_var = lambda x: isinstance(x, nnx.Variable)
    leaves = lambda tree: [v.get_value() for v in jax.tree.leaves(tree, is_leaf=is_var)]
    with nnx.logical_axis_rules(sharding.RULES):
        in_context = leaves(nnx.get_partition_spec(state))
    rows = []
    for (path, v), spec, named, ctx, abstract in zip(
            jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0], leaves(nnx.get_partition_spec(state)),
            leaves(nnx.get_named_sharding(state, mesh)), in_context, leaves(nnx.get_abstract_model(make, mesh)[1])):
        placed = v.get_value().sharding
        rows.append({"path": jax.tree_util.keystr(path), "logical": list(v.get_metadata().get("out_sharding") or ()),
                     "flax_spec": str(spec), "placed_spec": str(placed.spec),
                     "placed_as_flax": placed.is_equivalent_to(named, v.ndim),
                     "abstract_as_flax": abstract.sharding.is_equivalent_to(named, v.ndim),
                     "context_as_flax": ctx == spec})
    table = [{"name": name, "logical": list(logical), "spec": str(spec),
              "flax_logical": list(v.out_sharding), "flax_spec": str(flax_spec)}
             for (name, _, spec, _, logical), v, flax_spec in zip(
                 sharding.sharding_table(model, mesh)[0], jax.tree.leaves(params, is_leaf=is_var),
                 leaves(nnx.get_partition_spec(params)))]
    return {"rows": rows, "table": table}


def check_fsdp_fraction():
    """Fraction of parameter bytes sharded over fsdp on (1, 8), abstract d4 and d20 (no allocation)."""
    from flax import nnx
    from jaxchat import sharding
    from jaxchat.model import GPT, config_for_depth

    mesh = sharding.make_mesh((1, 8))
    out = {}
    for depth in (4, 20):
        model = nnx.eval_shape(lambda: GPT(config_for_depth(depth, 65536, 2048), rngs=nnx.Rngs(0)))
        rows, fraction = sharding.sharding_table(model, mesh)
        out[f"d{depth}"] = {"fraction": fraction, "per_device_bytes": sum(r[3] for r in rows),
                            "total_bytes": 4 * model.num_params()}
    return out


def check_mesh_equivalence():
    """5 steps of AdamW+Muon on 1 device and on each 8-device mesh: per-step losses and final parameters; the
    2026 optimizer (with a Muon weight decay) on (1, 8) and (2, 4), keyed "2026 <mesh>"."""
    import jax
    import numpy as np
    from flax import nnx
    from jaxchat import sharding
    from jaxchat.model import GPTConfig
    from jaxchat.optim import OptimConfig, get_muon_momentum, hyperparams
    from jaxchat.train import init_train_state, train_step

    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (5, 1, 8, TINY["sequence_len"] + 1), np.int32)

    def params_of(state):
        return jax.device_get(nnx.to_pure_dict(nnx.state(state.model, nnx.Param)))

    def run(mesh, recipe="2025"):
        with jax.set_mesh(mesh):
            state = init_train_state(GPTConfig(**TINY), OptimConfig.recipe(recipe, ns_dtype="float32"))  # fp32
            init = params_of(state)
            losses = []
            for step in range(5):
                batch = {"inputs": tokens[step, ..., :-1], "targets": tokens[step, ..., 1:]}
                hyper = hyperparams(1.0 - 0.1 * step, get_muon_momentum(step), 0.1 * (recipe == "2026"))
                state, metrics = train_step(state, sharding.shard_batch(batch, batch_axis=1), hyper)
                losses.append(float(metrics["loss"]))
        return losses, init, params_of(state)

    one_device = sharding.make_mesh((1, 1), jax.devices()[:1])
    out = {}
    for recipe, meshes in (("2025", MESHES), ("2026", MESHES[:2])):
        ref_losses, init, ref_params = run(one_device, recipe)
        prefix = "" if recipe == "2025" else "2026 "
        out[f"{prefix}reference_losses"] = ref_losses
        for shape in meshes:
            compare(out, f"{prefix}{shape}", *run(sharding.make_mesh(shape), recipe), ref_losses, init, ref_params)
    return out


def compare(out, key, losses, _, params, ref_losses, init, ref_params):
    """out[key]: the run's largest loss difference and per-parameter differences from the one-device run."""
    import jax
    import numpy as np

    stats = lambda a, b, a0: {"max": float(np.abs(a - b).max()),  # vs the reference run, and vs its change
                              "relative": float(np.linalg.norm(a - b) / np.linalg.norm(b - a0)),
                              "frac_over_1e-5": float(np.mean(np.abs(a - b) > 1e-5))}
    diff = jax.tree_util.tree_flatten_with_path(jax.tree.map(stats, params, ref_params, init,
                                                             is_leaf=lambda x: isinstance(x, np.ndarray)))[0]
    out[key] = {"loss_diff": float(np.abs(np.subtract(losses, ref_losses)).max()),
                "param_diff": {jax.tree_util.keystr(p[:-1]): {} for p, _ in diff}}
    for p, d in diff:
        out[key]["param_diff"][jax.tree_util.keystr(p[:-1])][p[-1].key] = d


def muon_grads(mesh, n_layer=2, seed=0):
    """Random gradients shaped and sharded (on `mesh`; None: one device) as a GPT's Muon matrices: square c_q and
    attn c_proj, wide c_fc, tall mlp c_proj, GQA c_k/c_v: three stacks of 2·n_layer matrices."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jaxchat.model import GPT, GPTConfig

    model = nnx.eval_shape(lambda: GPT(GPTConfig(**{**TINY, "n_layer": n_layer}), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)["h"]
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(params))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return grads if mesh is None else jax.tree.map(lambda g, s: jax.device_put(g, NamedSharding(mesh, s)), grads, specs)


def check_muon_sharded():
    """Muon (NS in bf16 on (1, 8) and (2, 4), in fp32 on (2, 4); the 2026 Muon, "2026" keys, as well) on gradients
    sharded as a 2-layer GPT's matrices (stacks of 4) plus a square and a tall matrix sharded otherwise (joining two
    of the stacks, padded to 8), vs one device (no mesh): the largest difference and the largest update entry. Two
    steps, the second from the first's state (NorMuon's second moment), with parameters (cautious decay)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxchat import sharding
    from jaxchat.optim import RECIPES, muon

    extra = {"both_axes": ((64, 64), P("fsdp", "data")), "tall_rows": ((256, 64), P(("data", "fsdp"), None))}
    grads = {"h": muon_grads(None),
             "extra": {k: jax.random.normal(jax.random.key(1), s) for k, (s, _) in extra.items()}}
    params = jax.tree.map(lambda g: 0.1 * jnp.roll(g, 1, axis=0), grads)
    fields_2026 = {k: RECIPES["2026"][k] for k in ("orthogonalizer", "muon_eq", "muon_plus", "normuon_beta2",
                                                    "cautious_weight_decay")}
    out = {}
    for recipe, fields in (("", {}), ("2026 ", fields_2026)):
        for dtype, meshes in (("bfloat16", MESHES[:2]), ("float32", MESHES[1:2])):
            tx = muon(0.02, ns_dtype=jnp.dtype(dtype), **fields)

            def step(g, p):
                hyper = dict(muon_momentum=0.9, muon_weight_decay=0.2)
                first, state = tx.update(g, tx.init(g), p, **hyper)
                return first, tx.update(jax.tree.map(jnp.flip, g), state, p, **hyper)[0]

            step = jax.jit(step)
            local = step(grads, params)
            for shape in meshes:
                mesh = sharding.make_mesh(shape)
                specs = {"h": jax.tree.map(lambda g: g.sharding.spec, muon_grads(mesh)),
                         "extra": {k: s for k, (_, s) in extra.items()}}
                put = lambda tree: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
                sharded_grads = put(grads)
                with jax.set_mesh(mesh):
                    sharded = step(sharded_grads, put(params))
                diffs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(local))]
                out[f"{recipe}{shape} {dtype}"] = {
                    "diff": max(diffs), "scale": max(float(jnp.abs(u).max()) for u in jax.tree.leaves(local)),
                    "n_shards": len(sharded_grads["extra"]["both_axes"].addressable_shards)}
    return out


def count_collectives(hlo_text):
    """Collective ops in a compiled HLO module's text, by kind (async ones counted by their -start)."""
    import re

    ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo_text)) for op in ops}


def check_muon_collectives():
    """Collectives in the compiled Muon update of a 3-layer GPT's matrices (three stacks of 6, padded to 8): Newton–
    Schulz per sharded matrix (GSPMD partitions each of its matmuls) with ns_steps 5, stacked with 5 and 10, on
    (1, 8); stacked on (2, 4). Updates and state pinned to the gradients' shardings, as the train step pins the new
    parameters and optimizer state."""
    import jax
    import jax.numpy as jnp
    import optax
    from jaxchat import sharding
    from jaxchat.optim import muon, nesterov_momentum, newton_schulz

    per_matrix = lambda steps: optax.chain(nesterov_momentum(), optax.stateless(
        lambda u, _: jax.tree.map(lambda g: newton_schulz(g, steps, jnp.bfloat16), u)))
    out = {}
    for shape, runs in (((1, 8), (("per_matrix", 5), ("stacked", 5), ("stacked", 10))), ((2, 4), (("stacked", 5),))):
        mesh = sharding.make_mesh(shape)
        grads = muon_grads(mesh, n_layer=3)
        for kind, steps in runs:
            tx = per_matrix(steps) if kind == "per_matrix" else muon(0.02, steps)
            state = tx.init(grads)  # zeros with the gradients' shardings
            with jax.set_mesh(mesh):
                update = jax.jit(lambda g, s: tx.update(g, s, muon_momentum=0.95),
                                 out_shardings=jax.tree.map(lambda x: x.sharding, (grads, state)))
                out[f"{shape} {kind} {steps}"] = count_collectives(update.lower(grads, state).compile().as_text())
    return out


def check_engine_sharded():
    """Greedy generation of 3 prompts × 2 samples (rows padded to the mesh) on 1 device and on each mesh, with
    FSDP weights and with replicated weights: tokens, and the largest difference of first-step logits."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jaxchat import engine as E, sharding
    from jaxchat.model import GPT, GPTConfig
    from jaxchat.tokenizer import RustBPETokenizer

    text = " ".join(f"hello world {i} the cat sat on the mat, number {i * 7}" for i in range(300))
    tok = RustBPETokenizer.train_from_iterator([text], 300)
    config = GPTConfig(**{**TINY, "vocab_size": 300})
    model = GPT(config, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("hello", "the cat sat on the mat", "number 7")]

    def run(engine):  # under the caller's mesh, if any
        results, _ = engine.generate_batch(prompts, num_samples=2, max_tokens=24, temperature=0.0)
        ds, _ = engine._start(prompts, 2, 24, 0)
        return results, jnp.asarray(jax.device_get(ds.logits))[:6], str(getattr(ds.cache.k[0].sharding, "spec", None))

    ref_tokens, ref_logits, _ = run(E.Engine(model, tok))
    out = {}
    for shape in MESHES[:2]:
        mesh = sharding.make_mesh(shape)
        state = nnx.state(model)
        sharded = nnx.merge(nnx.graphdef(model), jax.device_put(state, sharding.state_shardings(state, mesh)))
        for replicate in (False, True):
            with jax.set_mesh(mesh):
                tokens, logits, spec = run(E.Engine(sharded, tok, replicate_weights=replicate))
            out[f"{shape} replicate={replicate}"] = {"same_tokens": tokens == ref_tokens, "cache_spec": spec,
                                                     "logits_diff": float(jnp.abs(logits - ref_logits).max())}
    return out


def check_model_2026_sharded():
    """nanochat's 2026 model (value embeddings, lambdas, smear, backout, windows) on meshes: every parameter placed
    as its logical names say (the specs of the new ones), the loss and gradients on (2, 4) vs one device, and the
    engine's greedy tokens (smear's cached embedding through the shared prefix) on (2, 4), on one device and from
    full forward passes, and the web server's (its rows admit prefilled prompts and decode in windows of slots)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jaxchat import engine as E, sharding
    from jaxchat.model import GPT, NANOCHAT_2026, GPTConfig
    from jaxchat.serving import SlotServer
    from jaxchat.tokenizer import RustBPETokenizer

    text = " ".join(f"hello world {i} the cat sat on the mat, number {i * 7}" for i in range(300))
    tok = RustBPETokenizer.train_from_iterator([text], 300)
    # 4 layers: with 2 the backout layer (n_layer // 2) is the last one, and its lambda's gradient exactly 0
    config = GPTConfig(**{**TINY, "sequence_len": 512, "vocab_size": 300, "n_layer": 4}, **NANOCHAT_2026)
    make = lambda: GPT(config, rngs=nnx.Rngs(0))
    with jax.set_mesh(sharding.make_mesh((1, 8))):
        placed = sharding.create_sharded(make)
    specs, mismatches = {}, []
    for path, v in nnx.to_flat_state(nnx.state(placed, nnx.Param)):
        name = ".".join(map(str, path))
        specs[name] = str(v[...].sharding.spec)
        if not v[...].sharding.is_equivalent_to(nnx.get_named_sharding(v, v[...].sharding.mesh).get_value(), v.ndim):
            mismatches.append(name)
    model = make()
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)]))
    idx = jax.random.randint(jax.random.key(1), (8, 257), 0, 300)
    graphdef, params = nnx.split(model, nnx.Param)
    grad = jax.jit(jax.value_and_grad(lambda p, x: nnx.merge(graphdef, p)(x[:, :-1], x[:, 1:])))
    ref_loss, ref_grads = grad(params, idx)
    mesh = sharding.make_mesh((2, 4))
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, sharding.state_shardings(params, mesh))
        loss, grads = grad(sharded, jax.device_put(idx, jax.NamedSharding(mesh, sharding.batch_spec(2))))
    grad_diff = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("hello", "the cat sat on the mat", "number 7")]
    generate = lambda m: E.Engine(m, tok).generate_batch(prompts, num_samples=2, max_tokens=12, temperature=0.0)[0]
    one_device = generate(model)
    state = nnx.state(model)
    with jax.set_mesh(mesh):
        on_mesh = generate(nnx.merge(nnx.graphdef(model), jax.device_put(state, sharding.state_shardings(state, mesh))))
    def greedy(prompt, row):  # each generated token is the argmax of a full forward pass (no cache) over the row
        predicted = jnp.argmax(model(jnp.asarray([row[:-1]]))[0], axis=-1)[len(prompt) - 1:]
        return len(row) > len(prompt) and predicted.tolist() == row[len(prompt):]

    served = served_greedily(SlotServer(model, tok, slots=8, chunk=4), prompts, 12)
    return {"server_equals_full_forward": all(greedy(p, p + out) for p, out in zip(prompts, served)),
            "mismatches": mismatches, "specs": specs, "loss_diff": abs(float(loss) - float(ref_loss)),
            "grad_diff": grad_diff, "same_tokens_on_mesh": on_mesh == one_device,
            "engine_equals_full_forward": all(greedy(prompts[i // 2], r) for i, r in enumerate(one_device)),
            "finite": bool(np.isfinite(float(loss)))}


def served_greedily(server, prompts, max_tokens):
    """Each prompt's greedy tokens from a SlotServer's worker thread (started and stopped here)."""
    import threading

    from jaxchat.serving import Request

    server.start()
    outs, done = [[] for _ in prompts], [threading.Event() for _ in prompts]
    for i, p in enumerate(prompts):
        emit = lambda t, f, i=i: (outs[i].extend(t), f and done[i].set())
        server.submit(Request(prompt=p, max_tokens=max_tokens, emit=emit, temperature=0.0))
    assert all(d.wait(300) for d in done)
    server.stop()
    return outs


def check_server_sharded():
    """The web server's slots (8 rows) on 1 device and on each mesh, its worker thread decoding 10 prompts greedily:
    the tokens of every request, and how the cache rows are placed."""
    import jax
    from flax import nnx
    from jaxchat import sharding
    from jaxchat.model import GPT, GPTConfig
    from jaxchat.serving import SlotServer
    from jaxchat.tokenizer import RustBPETokenizer

    text = " ".join(f"hello world {i} the cat sat on the mat, number {i * 7}" for i in range(300))
    tok = RustBPETokenizer.train_from_iterator([text], 300)
    model = GPT(GPTConfig(**{**TINY, "vocab_size": 300}), rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    prompts = [tok.encode(f"hello the cat {i} " * (1 + i % 3), prepend="<|bos|>") for i in range(10)]

    def serve(server):
        return served_greedily(server, prompts, 24), str(getattr(server.rows.cache.k[0].sharding, "spec", None))

    ref, _ = serve(SlotServer(model, tok, slots=8, chunk=4))
    out = {}
    for shape in MESHES[:2]:
        mesh = sharding.make_mesh(shape)
        state = nnx.state(model)
        sharded = nnx.merge(nnx.graphdef(model), jax.device_put(state, sharding.state_shardings(state, mesh)))
        with jax.set_mesh(mesh):
            server = SlotServer(sharded, tok, slots=8, chunk=4)
        tokens, spec = serve(server)
        out[str(shape)] = {"same_tokens": tokens == ref, "cache_spec": spec}
    return out


def check_decoding_programs():
    """The programs `jaxchat.memory` compiles from shapes alone for the engine's decode loop and the server's decode
    step, on a (1, 8) mesh in bf16, against the arrays the engine and the server really build: every argument's
    shape, dtype and sharding; and the bytes the server's step all-gathers per token beside its weights'."""
    import jax
    from flax import nnx
    from jaxchat import aot, engine as E, memory, sharding
    from jaxchat.model import GPT, GPTConfig
    from jaxchat.serving import SlotServer
    from jaxchat.tokenizer import RustBPETokenizer

    tok = RustBPETokenizer.train_from_iterator([" ".join(f"the cat sat {i}" for i in range(200))], 300)
    config = GPTConfig(**{**TINY, "vocab_size": 300, "compute_dtype": "bfloat16"})
    mesh = sharding.make_mesh((1, 8))
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("the cat", "the cat sat on", "sat")]
    with jax.set_mesh(mesh):
        model = sharding.create_sharded(lambda: GPT(config, rngs=nnx.Rngs(0)))
        shape = (*E.prefill_shape(len(prompts), 2, max(map(len, prompts))), 24)
        engine = E.Engine(model, tok)
        engine_rows = engine._start(prompts, 2, 24, 0)[0]
        server = SlotServer(model, tok, slots=8, chunk=4)
    programs = {"engine": (memory.compile_engine(config, shape, mesh)[1][1], (engine.state, engine_rows)),
                "server": (memory.compile_server(config, 8, 4, mesh)[1][1], (server.state, server.rows))}
    out = {}
    for name, (compiled, real) in programs.items():  # the arguments (weights, rows, ...), static ones left out
        (*args_info,), _ = compiled.args_info
        (*args_where,), _ = compiled.input_shardings
        args_info, args_where = args_info[:2], args_where[:2]  # the engine's decode loop also takes `stop`
        differences = [f"{x.shape} {x.dtype} {x.sharding} != {i.shape} {i.dtype} {w}" for x, i, w in
                       zip(jax.tree.leaves(real), jax.tree.leaves(args_info), jax.tree.leaves(args_where))
                       if (x.shape, x.dtype) != (i.shape, i.dtype) or not w.is_equivalent_to(x.sharding, x.ndim)]
        stats = aot.program_stats(compiled.as_text())
        out[name] = {"arrays": len(jax.tree.leaves(real)), "compiled_arrays": len(jax.tree.leaves(args_info)),
                     "differences": differences, "all_gather_bytes": stats["collectives"].get("all-gather", (0, 0))[1]}
    out["server"]["weights_bytes"] = sum(x.nbytes for x in jax.tree.leaves(server.state))
    return out


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    results = {}
    for name in sys.argv[1:] or CHECKS:
        try:
            results[name] = CHECKS[name]()
        except Exception:  # report, so the other checks still run
            results[name] = {"error": traceback.format_exc()}
    print(json.dumps(results))
