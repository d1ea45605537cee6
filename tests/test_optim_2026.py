"""nanochat's 2026 optimizer (MuonAdamW) and schedules against nanochat's own code: fixtures written by
tests/fixtures/make_nanochat2026_optimizer.py (torch, CPU, fp32), read here with NumPy only."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxchat.optim import (ADAMW_GROUPS, GROUPS, MUON_MOMENTUM, OptimConfig, batch_lr_scale, build_optimizer,
                           get_lr_multiplier, get_muon_momentum, get_muon_weight_decay, hyperparams, muon,
                           normuon_axis, param_labels, polar_express, scaled_weight_decay)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "nanochat2026")
META = json.load(open(os.path.join(HERE, "optimizer.json")))
SCHEDULES = json.load(open(os.path.join(HERE, "schedules.json")))
EMBEDDINGS = ("transformer.wte.weight", "value_embeds.")  # (V, d) in both layouts; other 2-D weights transpose


def jax_path(torch_name):
    """nanochat's parameter name -> the path of the GPT state (CONTRACT: `h[i].attn.c_q.kernel`, `wte`, ...)."""
    parts = torch_name.removeprefix("transformer.").split(".")
    if parts[0] in ("wte", "value_embeds"):
        return tuple(parts[:-1])  # value_embeds.<i>.weight -> ("value_embeds", "<i>")
    return tuple(parts[:-1]) + ("kernel",) if parts[-1] == "weight" else tuple(parts)


def to_jax(torch_name, x):
    return x.T if x.ndim == 2 and not torch_name.startswith(EMBEDDINGS) else x


def nested(flat):
    tree = {}
    for path, x in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    return tree


@pytest.fixture(scope="module")
def fixture():
    with np.load(os.path.join(HERE, "optimizer.npz")) as f:
        arrays = {k: f[k] for k in f.files}
    names = sorted({k.split("/", 1)[1] for k in arrays})
    tree = lambda prefix: nested({jax_path(n): jnp.asarray(to_jax(n, arrays[f"{prefix}/{n}"]), jnp.float32)
                                  for n in names})
    return {"names": names, "init": tree("init"), "grads": [tree(f"grad{s}") for s in range(META["steps"])],
            "after": [tree(f"step{s}") for s in range(META["steps"])]}


def config_2026(**fields):
    return OptimConfig.recipe("2026", **{**META["lrs"], "batch_lr_scale": META["batch_lr_scale"], **fields})


def test_groups_are_nanochats(fixture):
    """Every parameter in nanochat's group, each AdamW group with nanochat's lr (float64, exact), betas, eps and
    weight decay; every block matrix in Muon."""
    labels = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(param_labels(fixture["init"]))}
    table = ADAMW_GROUPS["2026"](config_2026(), META["config"]["n_embd"])
    for group in META["groups"]:
        ours = {labels[jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in jax_path(n)))]
                for n in group["params"]}
        assert len(ours) == 1, (group, ours)
        label = ours.pop()
        if group["kind"] == "muon":
            assert label == "matrix"
            continue
        lr, betas, wd = table[label]
        assert (lr, tuple(betas), wd) == (group["lr"], tuple(group["betas"]), group["weight_decay"]), label
        assert group["eps"] == config_2026().adam_eps
    assert set(GROUPS.values()) == set(table) | {"matrix"}


@pytest.mark.parametrize("orientation", ["jax", "torch"])
def test_polar_express_orientation_free(orientation):
    """nanochat iterates tall matrices on XᵀX and others on X·Xᵀ; jaxchat always on the small Gram matrix. The
    polynomial commutes with the transpose: equal to fp32 rounding on a square matrix either way."""
    g = jax.random.normal(jax.random.key(0), (48, 48))
    x = g if orientation == "jax" else g.T
    np.testing.assert_allclose(polar_express(x).T, polar_express(x.T), atol=2e-6)


def compare_step(got, ref, old):
    """(largest difference, the step's largest change, parameter entries off by more than the tolerance) of one
    parameter after one step: within 1e-6 × max(1, |p|) and 1e-5 of the step's change plus 2 ulps of the
    parameter (what storing it rounds)."""
    got, ref, old = map(np.asarray, (got, ref, old))
    diff, change = np.abs(got - ref), np.abs(ref - old).max()
    tolerance = min(1e-6 * max(1.0, np.abs(ref).max()), 1e-5 * change + 2 * np.spacing(np.abs(ref).max()))
    return diff, change, diff > tolerance


@pytest.mark.slow
def test_optimizer_matches_nanochat(fixture):
    """Three steps of given gradients with base_train's per-step lr multiplier, momentum and weight decay, every
    orthogonaliser in fp32 (as nanochat on CPU): every parameter entry within 1e-6 × max(1, |p|) of nanochat's after
    every step (the embeddings, |p| up to ~7.5 after AdamW steps of 2.08 = 0.3·√2·(32/768)^−½, differ by a few fp32
    ulps: on wte nanochat's own fp32 result is 4.1e-6 from the same steps in float64, jaxchat's 2.9e-6) and within
    1e-5 of the step's largest change (+ 2 ulps of p). Exception, as it must be: an entry whose
    Muon update is 0 to rounding (|g| ~1e-8 of 1e-2), where the cautious mask g·p ≥ 0 may go either way; there
    one side took exactly the decay lr·wd·|p| and the other nothing (one such entry in the 3 steps).
    Measured (-s prints each): Muon ≤ 9e-8 (≤ 7.5e-6 of the step), AdamW ≤ 3.8e-6 (≤ 6e-7 of max(1, |p|))."""
    config = config_2026(ns_dtype="float32")
    tx = build_optimizer(META["config"]["n_embd"], config)
    params, state = fixture["init"], tx.init(fixture["init"])
    schedule = META["schedule"]
    step_fn = jax.jit(lambda g, s, p, h: tx.update(g, s, p, **h))
    flips = 0
    for step, (grads, want) in enumerate(zip(fixture["grads"], fixture["after"])):
        lrm, momentum, wd = (schedule[k][step] for k in ("lr_multiplier", "muon_momentum", "weight_decay"))
        updates, state = step_fn(grads, state, params, hyperparams(lrm, momentum, wd))
        new = optax.apply_updates(params, updates)
        for (path, got), ref, old in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(want),
                                         jax.tree.leaves(params)):
            name = jax.tree_util.keystr(path)
            diff, change, off = compare_step(got, ref, old)
            kept = np.where(off, 0, diff).max()
            print(f"step {step} {name}: max|Δ| {kept:.2e}, / step {kept / change:.2e}, mask flips {off.sum()}")
            if off.any():  # only cautious-decay mask flips, in Muon matrices
                assert name.startswith("['h']"), (step, name, diff.max())
                aspect = max(1.0, old.shape[1] / old.shape[0]) ** 0.5
                decay = config.matrix_lr * config.batch_lr_scale * lrm * aspect * wd * np.abs(np.asarray(old))
                moved = np.minimum(np.abs(np.asarray(ref - old)), np.abs(np.asarray(got - old)))
                np.testing.assert_allclose(diff[off], decay[off], rtol=1e-3)
                assert (moved[off] <= 1e-5 * change).all(), (step, name)
                flips += off.sum()
        params = new
    assert flips <= 2


def test_normuon_state_per_matrix():
    """NorMuon's second moment: per row of torch's weight (our axis 1) when rows ≥ cols, else per column (axis 0),
    kept with the reduced axis of size 1 in our layout."""
    shapes = {"c_fc": (32, 128), "mlp_proj": (128, 32), "square": (32, 32), "ve_gate": (12, 2)}
    grads = {k: jnp.ones(s) for k, s in shapes.items()}
    tx = muon(0.02, ns_dtype=jnp.float32, normuon_beta2=0.9)
    second = tx.init(grads)[2].second_moment  # chain: momentum, orthogonaliser, NorMuon, ...
    assert {k: v.shape for k, v in second.items()} == {"c_fc": (1, 128), "mlp_proj": (128, 1), "square": (1, 32),
                                                        "ve_gate": (12, 1)}
    assert [normuon_axis(s) for s in shapes.values()] == [0, 1, 0, 1]


@pytest.mark.parametrize("run", range(len(SCHEDULES["schedules"])))
def test_schedules_match_base_train(run):
    """lr multiplier, Muon momentum and Muon weight decay at every step of nanochat's horizons (a long one, one
    whose warmdown starts inside the 400-step momentum ramp, one shorter than its warmup): exactly equal (both
    compute in float64)."""
    ref = SCHEDULES["schedules"][run]
    n, flags = ref["num_iterations"], ref["flags"]
    steps = range(n + 1)
    assert [get_lr_multiplier(s, n, flags["warmup_steps"], flags["warmdown_ratio"], flags["final_lr_frac"])
            for s in steps] == ref["lr_multiplier"]
    momentum = [get_muon_momentum(s, **MUON_MOMENTUM["2026"], num_iterations=n, warmdown_ratio=flags["warmdown_ratio"])
                for s in steps]
    assert momentum == ref["muon_momentum"]
    assert [get_muon_weight_decay(s, n, ref["weight_decay_scaled"]) for s in steps] == ref["weight_decay"]


def test_batch_and_weight_decay_scaling():
    for ref in SCHEDULES["scaling"]:
        assert batch_lr_scale(ref["total_batch_size"]) == ref["batch_lr_scale"]
        assert scaled_weight_decay(ref["weight_decay"], ref["total_batch_size"], ref["target_tokens"],
                                   ref["D_REF"]) == ref["weight_decay_scaled"]


def test_base_train_flags_follow_the_recipe():
    """--optimizer picks the recipe's flag defaults (nanochat's names, dashes or underscores); a flag given wins,
    before or after it; the 2026 OptimConfig scales every LR by √(B/2¹⁹)."""
    from jaxchat import base_train
    from jaxchat.run import optim_config

    parse = base_train.build_parser().parse_args
    october, recipe = parse([]), parse(["--warmup-steps=7", "--optimizer=2026", "--total_batch_size=1048576"])
    assert (october.embedding_lr, october.weight_decay, october.grad_clip, october.warmup_steps) == (0.2, 0.0, 1.0, 0)
    assert (recipe.embedding_lr, recipe.unembedding_lr, recipe.weight_decay, recipe.grad_clip) == (0.3, 0.008, 0.28, 0)
    assert (recipe.warmup_steps, recipe.warmdown_ratio, recipe.final_lr_frac) == (7, 0.65, 0.05)
    # --optimizer follows --model unless given: --model=2026 alone is nanochat's 2026 run
    assert [parse(a).optimizer for a in (["--model=2026"], ["--model=2026", "--optimizer=2025"])] == ["2026", "2025"]
    assert optim_config(october) == OptimConfig()
    config = optim_config(recipe)
    assert config == config_2026(weight_decay=0.28)  # the fixture's LRs and batch (2²⁰: √2)


def test_base_train_schedule_is_nanochats():
    """base_train's per-step hyperparams (2026) are nanochat's schedules of the 500-step horizon, in fp32."""
    from jaxchat import base_train

    ref = SCHEDULES["schedules"][1]
    flags = [f"--{k}={v}" for k, v in ref["flags"].items()]
    args = base_train.build_parser().parse_args(["--optimizer=2026", *flags])
    hyper = base_train.schedule(args, ref["num_iterations"], ref["weight_decay_scaled"])
    for step in range(ref["num_iterations"]):
        got = hyper(step)
        for key, name in (("lr_multiplier", "lr_multiplier"), ("muon_momentum", "muon_momentum"),
                          ("muon_weight_decay", "weight_decay")):
            assert got[key] == np.float32(ref[name][step]), (step, key)
