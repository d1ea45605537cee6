"""Sharding on 8 fake CPU devices (one subprocess runs every check in tests/_multidevice.py), plus the table."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from _harness import run_checks
from _multidevice import MESHES
from jaxchat import sharding


@pytest.fixture(scope="module")
def results():
    return run_checks()


def result(results, name):
    out = results[name]
    assert "error" not in out, out.get("error")
    return out


def test_logical_table():
    assert sharding.logical_to_spec(("vocab", "embed")) == P(None, "fsdp")
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", None)
    assert sharding.batch_spec(3, batch_axis=1) == P(None, ("data", "fsdp"), None)
    assert sharding.batch_shards() == 1  # no mesh active


def test_flax_resolves_parameters_logical_names():
    """Flax's own nnx.get_partition_spec, with no rules context, turns every parameter's logical names into mesh
    axes with RULES (never reads a logical name as a mesh axis), as jaxchat does for activations."""
    from flax import nnx
    from jaxchat.model import GPT, GPTConfig

    model = nnx.eval_shape(lambda: GPT(GPTConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=2), rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    for v in params:
        spec = nnx.get_partition_spec(v).get_value()
        assert spec == sharding.logical_to_spec(v.out_sharding), (v.out_sharding, spec)
        assert {a for ax in spec if ax for a in ((ax,) if isinstance(ax, str) else ax)} <= set(sharding.AXES)
    assert nnx.get_partition_spec(model.wte).get_value() == P(None, "fsdp")
    assert nnx.get_partition_spec(model.h[0].mlp.c_fc.kernel).get_value() == P("fsdp", None)
    with nnx.logical_axis_rules((("embed", "data"),)), pytest.raises(ValueError, match="Inconsistent"):
        nnx.get_partition_spec(model.wte)  # Flax refuses a context that disagrees with the parameters' rules


@pytest.mark.slow
def test_flax_reports_what_jaxchat_places(results):
    """On an 8-device mesh, every parameter's and optimizer buffer's sharding is the one Flax's own API reports
    (get_named_sharding; the same under an nnx.logical_axis_rules context and from get_abstract_model), and the
    table's logical and mesh specs are Flax's."""
    out = result(results, "flax_specs")
    for row in out["rows"]:
        assert row["placed_as_flax"] and row["abstract_as_flax"] and row["context_as_flax"], row
        if row["logical"]:
            assert row["flax_spec"] == str(sharding.logical_to_spec(row["logical"])), row
    assert sum(bool(r["logical"]) for r in out["rows"]) >= 30  # 14 params + Adam mu/nu + Muon buffers
    assert sum("fsdp" in r["placed_spec"] for r in out["rows"]) >= 30
    assert len(out["table"]) == 14
    for row in out["table"]:
        assert row["logical"] == row["flax_logical"] and row["spec"] == row["flax_spec"], row


@pytest.mark.slow
def test_params_and_optimizer_state_follow_the_table(results):
    out = result(results, "param_shardings")
    assert out["mismatches"] == []
    assert out["checked"] > 60  # two states (October and 2026 optimizers): params, Adam mu/nu, Muon buffers, counters
    assert out["fsdp_sharded_arrays"] >= 30  # 14 params + their Adam/Muon buffers
    assert out["batch_shards"] == 8


@pytest.mark.slow
def test_fsdp_fraction(results):
    for depth, out in result(results, "fsdp_fraction").items():
        assert out["fraction"] >= 0.98, depth
        assert out["per_device_bytes"] * 8 == out["total_bytes"], depth


@pytest.mark.slow
def test_meshes_agree_with_one_device(results):
    """5 AdamW+Muon steps (lr multiplier and momentum changing) on (1,8), (2,4), (8,1) vs 1 device.

    Tolerances: sharding only changes the order of fp32 reductions (and how the CPU kernels chunk the batch), each
    ~1e-7 relative. Losses (≈6.2) agree to 1e-5 relative (measured ≤ 2.2e-6) and every Muon matrix to 1e-5
    absolute (measured ≤ 1.2e-7): Newton–Schulz (fp32 here) normalises the update, so rounding stays relative to
    an lr-sized step. wte and lm_head are AdamW (lr 0.2·s = 0.69 and 0.004·s = 0.014 at width 64,
    eps 1e-10): a gradient entry that is zero up to rounding (~1e-10 once divided by the token count) is as large
    as eps, and Adam turns its rounding into a visible fraction of an lr step. So for them: ≤ 0.1% of entries off
    by more than 1e-5 and ‖Δ‖ ≤ 1e-3·‖their change over the 5 steps‖ (measured ≤ 0.012% and 1e-4).
    The 2026 optimizer (Polar Express, NorMuon with its per-matrix state sharded as its matrix, cautious weight
    decay 0.1) on (1, 8) and (2, 4): the same tolerances (measured: losses ≤ 4.8e-7, Muon matrices ≤ 2e-7). A
    cautious-decay mask flip (an update entry 0 to rounding) would move one entry by lr·wd·|p| ~1e-4: none here."""
    out = result(results, "mesh_equivalence")
    for prefix, meshes in (("", MESHES), ("2026 ", MESHES[:2])):
        for shape in meshes:
            run = out[f"{prefix}{shape}"]
            assert run["loss_diff"] <= 1e-5 * max(out[f"{prefix}reference_losses"]), (prefix, shape)
            for name, d in run["param_diff"].items():
                if name in ("['wte']", "['lm_head']['kernel']"):
                    assert d["frac_over_1e-5"] <= 1e-3 and d["relative"] <= 1e-3, (prefix, shape, d)
                else:
                    assert d["max"] <= 1e-5, (prefix, shape, name, d)
    assert np.all(np.isfinite(out["reference_losses"]))


@pytest.mark.slow
def test_muon_sharded_equals_unsharded(results):
    """Stacked Muon on (1, 8) and (2, 4) vs one device, two steps. Every device runs the same per-matrix arithmetic
    as the one device does, only the number of matrices in its batched matmuls differs: fp32 NS within 1e-5 of the
    largest update entry (measured 1.2e-6), bf16 NS within 3e-2, its own error vs exact NS (measured: bitwise
    equal). The 2026 Muon (keys "2026 ...": MuonEq, Muon+ and NorMuon on the sharded matrices, Polar Express in
    the stacks) too (measured 3.8e-6 fp32, 3.6e-7 bf16). A wrong matrix, orientation or padding would be off by
    O(1)."""
    for name, out in result(results, "muon_sharded").items():
        assert out["n_shards"] == 8
        tolerance = 1e-5 if "float32" in name else 3e-2
        assert out["diff"] <= tolerance * out["scale"], (name, out)


@pytest.mark.slow
def test_muon_collectives(results):
    """Stacked Newton–Schulz (each device orthogonalises whole matrices) vs NS per sharded matrix, in the compiled
    Muon update: far fewer collectives (measured 10 all-to-alls vs 135 all-gathers + 46 all-reduces on (1, 8) for
    18 matrices), the same number whatever ns_steps. On (1, 8) the stacks are split over fsdp with all-to-alls
    only; on (2, 4) one all-gather per stack (its results over "data") is added: the input stacks are never gathered
    whole (which GSPMD does when asked to split a partly replicated stack over every axis in one step)."""
    counts = result(results, "muon_collectives")
    total = lambda key: sum(counts[key].values())
    assert counts["(1, 8) stacked 5"] == counts["(1, 8) stacked 10"], counts
    assert counts["(1, 8) stacked 5"]["all-gather"] == 0 and counts["(2, 4) stacked 5"]["all-gather"] <= 3, counts
    assert 10 * total("(1, 8) stacked 5") <= total("(1, 8) per_matrix 5"), counts


def test_sharding_table_prints(capsys):
    from flax import nnx
    from jaxchat.model import GPT, config_for_depth

    model = nnx.eval_shape(lambda: GPT(config_for_depth(4, 8192, 512), rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh((1, 1), jax.devices()[:1])
    sharding.print_sharding_table(model, mesh)
    text = capsys.readouterr().out
    assert "h.0.attn.c_q.kernel" in text and "wte" in text and "100.0% of parameter bytes" in text
    assert "logical" in text and "mesh spec" in text
    wte = next(line for line in text.splitlines() if line.startswith("wte "))
    assert "('vocab', 'embed')" in wte and "P(None, 'fsdp')" in wte  # logical names, then Flax's mesh spec


@pytest.mark.slow
def test_engine_on_meshes_agrees_with_one_device(results):
    """Rows sharded over the batch axes (weights FSDP or replicated): same greedy tokens as 1 device, first-step
    logits within 1e-5 (only the order of fp32 reductions changes)."""
    for name, run in result(results, "engine_sharded").items():
        assert run["same_tokens"], name
        assert run["logits_diff"] <= 1e-5, (name, run["logits_diff"])
        assert "data" in run["cache_spec"] or "fsdp" in run["cache_spec"], (name, run["cache_spec"])


@pytest.mark.slow
def test_server_slots_sharded_equal_one_device(results):
    """The web server's rows split over the mesh's batch axes decode what one device does."""
    for name, run in result(results, "server_sharded").items():
        assert run["same_tokens"], name
        assert "data" in run["cache_spec"] or "fsdp" in run["cache_spec"], (name, run["cache_spec"])


@pytest.mark.slow
def test_memory_compiles_the_decoders_the_engine_and_server_run(results):
    """`jaxchat.memory`'s engine and server programs, built from shapes alone, take exactly the arrays (shape, dtype,
    sharding) the real engine and server hold on a (1, 8) mesh; their weights are replicated, so a decode step
    gathers none of them."""
    out = result(results, "decoding_programs")
    for name in ("engine", "server"):
        assert out[name]["arrays"] == out[name]["compiled_arrays"] > 10, out[name]
        assert out[name]["differences"] == [], out[name]["differences"]
        assert out[name]["all_gather_bytes"] < 0.01 * out["server"]["weights_bytes"], out


@pytest.mark.slow
def test_model_2026_on_meshes():
    """nanochat's 2026 model: value tables split like wte, gates and lambdas replicated; loss and gradients on a
    (2, 4) mesh as on one device (fp32 reduction order only); the engine's greedy tokens equal on the mesh, on one
    device and from full forward passes (smear's cached embedding, through the engine's shared prefix), and the
    web server's tokens too."""
    out = result(run_checks(["model_2026_sharded"]), "model_2026_sharded")
    assert out["mismatches"] == []
    specs = out["specs"]
    assert specs["value_embeds.1"] == specs["wte"] == "P(None, 'fsdp')"
    assert specs["h.1.attn.ve_gate.kernel"] == specs["smear_gate.kernel"] == "P(None, None)"
    assert {specs[n] for n in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda")} == {"P(None,)"}
    assert out["loss_diff"] <= 1e-5 and out["grad_diff"] <= 1e-4
    assert out["same_tokens_on_mesh"] and out["engine_equals_full_forward"] and out["server_equals_full_forward"]
