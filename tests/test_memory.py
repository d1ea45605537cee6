"""jaxchat.memory and jaxchat.aot: what the compiler says about a program (read from its HLO), the CPU figure
against what a CPU run allocates, and programs compiled for GPUs and TPUs this machine does not have."""
import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from _harness import run_python
from jaxchat import aot

HAS_CUDA_COMPILER = importlib.util.find_spec("jax_cuda12_plugin") is not None
HAS_TPU_COMPILER = importlib.util.find_spec("libtpu") is not None
# a 4-layer model on 8 devices: tiny's 4,096 tokens per step are one device's batch
TINY = ["-m", "jaxchat.memory", "--config=tiny", "--total_batch_size=32768", "--stages=base_train"]

HLO = """HloModule jit_f, entry_computation_layout={(f32[4,16]{1,0})->f32[4,8]{1,0}}

%fused_dot (p0: f32[4,16], p1: f32[16,8]) -> f32[4,8] {
  %p0 = f32[4,16]{1,0} parameter(0)
  %p1 = f32[16,8]{1,0} parameter(1)
  ROOT %dot.2 = f32[4,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (state: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %state = (s32[], f32[4,16]{1,0}) parameter(0)
  %x = f32[4,16]{1,0} get-tuple-element(%state), index=1
  %w = f32[16,8]{1,0} constant({...})
  %gemm = f32[4,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %ag-start = (f32[1,8]{1,0}, f32[4,8]{1,0}) all-gather-start(%gemm), channel_id=1, dimensions={0}
  %ag-done = f32[4,8]{1,0} all-gather-done(%ag-start)
  %attn = (bf16[4,8]{1,0}, u8[0]{0}) custom-call(%ag-done), custom_call_target="__cudnn$fmhaSoftmax"
  %fusion.7.remat = f32[4,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_dot
  ROOT %out = (s32[], f32[4,16]{1,0}) tuple(%state, %x)
}

%cond (state: (s32[], f32[4,16])) -> pred[] {
  %state = (s32[], f32[4,16]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

%scan_cond (state: (s32[], f32[4,16])) -> pred[] {
  %n = s32[] constant(2)
  %state = (s32[], f32[4,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%cheap (p: f32[4,16]) -> f32[4,16] {
  ROOT %p = f32[4,16]{1,0} parameter(0)
}

%costly (p: f32[4,16]) -> f32[4,8] {
  %p = f32[4,16]{1,0} parameter(0)
  %w = f32[16,8]{1,0} constant({...})
  ROOT %gemm = f32[4,8]{1,0} fusion(%p, %w), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}

ENTRY %main (x: f32[4,16]) -> f32[4,8] {
  %x = f32[4,16]{1,0} parameter(0)
  %loop = (s32[], f32[4,16]{1,0}) while(%x), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %scan = (s32[], f32[4,16]{1,0}) while(%x), condition=%scan_cond, body=%body
  %ar = bf16[2,8]{1,0} all-reduce(%x), channel_id=2, to_apply=%cond
  %p = pred[] constant(true)
  %if = f32[4,8]{1,0} conditional(%p, %x, %x), true_computation=%costly, false_computation=%cheap
  %switch = f32[4,8]{1,0} conditional(%p, %x, %x), branch_computations={%cheap, %costly}
  ROOT %y = f32[4,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""


def test_program_stats_multiply_loop_bodies_by_their_trip_counts():
    s = aot.program_stats(HLO)
    loop_dot, entry_dot = 2 * 4 * 8 * 16, 2 * 4 * 8 * 16
    # the body runs 3 times (XLA's annotation) + 2 (the scan's condition i < 2): its fused GEMM and the .remat
    # fusion (which calls the same GEMM computation) each time; of each conditional, the costly branch once
    assert s["flops"] == 5 * 2 * loop_dot + entry_dot + 2 * loop_dot
    assert s["custom_calls"] == {"__cudnn$fmhaSoftmax": 5}
    assert s["gemm_fusions"] == {"__triton_gemm": 5 + 2}
    assert s["collectives"] == {"all-gather": (5, 5 * 4 * 8 * 4), "all-reduce": (1, 2 * 8 * 2)}
    assert s["rematerialized"] == 1  # named once in the program text


def test_program_flops_of_a_compiled_scan_are_exact():
    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]

    x, w = jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 128), jnp.float32)
    stats = aot.analyse(jax.jit(f).lower(x, w).compile())
    assert stats["flops"] == 5 * 2 * 64 * 128 * 128
    assert stats["peak"] >= 2 * 64 * 128 * 4 + 128 * 128 * 4  # input and output, weights


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("batch", [4, 16])
def test_compiled_figure_matches_what_the_cpu_run_allocates(batch):
    out = run_python(["tests/_memory_probe.py", "4", str(batch)], MALLOC_MMAP_THRESHOLD_="65536")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["predicted"] > 100e6  # large enough that allocator noise does not decide the test
    assert abs(r["grown"] - r["predicted"]) < 0.1 * r["predicted"], r


def figures(stdout):
    """{label: line} of the per-device lines `python -m jaxchat.memory` printed."""
    return {line.split("  ")[1].strip(): line for line in stdout.splitlines() if line.startswith("  ")}


@pytest.mark.slow
def test_cli_every_stage_on_fake_cpu_devices():
    out = run_python(["-m", "jaxchat.memory", "--config=tiny", "--devices=2", "--total_batch_size=8192"])
    assert out.returncode == 0, out.stderr[-3000:]
    for stage, batch in [("base_train", "16 × 256 tokens × 1"), ("mid_train", "16 × 256 tokens × 1"),
                         ("chat_sft", "8 × 256 tokens × 1"), ("chat_rl", "16 × 256 tokens × 2")]:
        assert f"{stage}: d4 float32 | mesh {{'data': 1, 'fsdp': 2}} | device batch {batch} micro-batches" in out.stdout
    assert "custom calls per step: none" in out.stdout  # jaxchat's own attention kernel: plain XLA on CPU
    lines = figures(out.stdout)
    assert {"parameters", "optimizer state", "peak", "weights", "KV cache"} <= set(lines)
    # the decoders as chat_rl (8 problems × 8 samples, 48 new tokens after prompts filling the rest of the 256
    # context) and the server (8 slots, chunk 16) size them
    assert "engine: d4 float32 | mesh {'data': 1, 'fsdp': 2} | 8 prompts × 256 tokens, 64 rows × 48 new tokens" \
        in out.stdout
    assert "server: d4 float32 | mesh {'data': 1, 'fsdp': 2} | 8 slots, chunk 16, context 256" in out.stdout
    assert "decode loop: compiled" in out.stdout and "decode call (8 rows × up to 16 tokens): compiled" in out.stdout


def gathered_mib(stdout, unit):
    """MiB all-gathered per `unit` by each program that printed collectives per `unit`."""
    return [float(m) for line in stdout.splitlines() if line.startswith(f"  collectives per {unit}:")
            for m in re.findall(r"all-gather \(([\d.,]+) MiB\)", line) or ["0"]]


def test_cli_bad_input_is_one_line():
    for args, error in [(["--remat=sometimes"], "error: base_train.remat='sometimes': expected one of none, block, "
                                                "matmuls, attention"),
                        (["--target=h300"], "error: --target=h300: one of " + ", ".join(aot.TARGETS)),
                        (["--stages=base_eval"], "error: --stages: base_eval not among base_train, mid_train, "
                                                 "chat_sft, chat_rl, engine, server")]:
        out = run_python(["-m", "jaxchat.memory", "--config=tiny", "--devices=2", *args])
        assert out.returncode != 0 and out.stderr.strip().splitlines() == [error], out.stderr[-2000:]


def test_a_missing_compiler_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(aot.UserError, match=r"--target=h100 needs XLA's CUDA compiler .*jaxchat\[gpu\]"):
        aot.check_target("h100")
    with pytest.raises(aot.UserError, match=r"--target=tpu-v6e needs the TPU compiler, libtpu .*jaxchat\[tpu\]"):
        aot.check_target("tpu-v6e")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_COMPILER, reason="XLA's CUDA compiler is not installed (pip install 'jaxchat[gpu]')")
def test_h100_program_runs_cudnn_attention_in_bf16_and_xla_attention_in_fp32():
    bf16 = run_python([*TINY, "--target=h100", "--dtype=bfloat16"])
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    assert "h100: 8 × NVIDIA H100 80GB HBM3" in bf16.stdout
    assert "custom calls per step: 4 × __cudnn$fmhaSoftmax, 4 × __cudnn$fmhaSoftmaxBackward" in bf16.stdout
    assert "fits H100 80GB (71.7 GiB usable)" in bf16.stdout and "rematerialised" not in bf16.stdout
    fp32 = run_python([*TINY, "--target=h100", "--dtype=float32"])  # cuDNN's flash attention needs 16 bits
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    assert "custom calls per step: none" in fp32.stdout  # jaxchat's own attention kernel


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TPU_COMPILER, reason="the TPU compiler is not installed (pip install 'jaxchat[tpu]')")
def test_tpu_v5p_program_compiles_and_fits():
    out = run_python([*TINY, "--total_batch_size=16384", "--target=tpu-v5p", "--dtype=bfloat16"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tpu-v5p: 4 × TPU v5" in out.stdout and "mesh {'data': 1, 'fsdp': 4}" in out.stdout
    assert "fits TPU v5p (95.0 GiB usable)" in out.stdout
    for kernel in ("splash_mha_fwd_residuals", "splash_mha_dq_no_residuals", "splash_mha_dkv_no_residuals"):
        assert f"4 × {kernel}" in out.stdout  # Splash attention in each of the 4 layers, forward and backward
    assert "× all-gather" in out.stdout  # FSDP over the 4 chips
    assert "could not determine TPU" not in out.stderr  # libtpu told it is only compiling


DECODERS = ["-m", "jaxchat.memory", "--config=tiny", "--stages=engine,server", "--dtype=bfloat16"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_COMPILER, reason="XLA's CUDA compiler is not installed (pip install 'jaxchat[gpu]')")
def test_h100_decoders_compile_and_gather_no_weights():
    out = run_python([*DECODERS, "--target=h100"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("fits H100 80GB") == 4  # the engine's prefill and loop, the server's prefill and call
    assert "__triton_nested_gemm_fusion" in out.stdout  # the rows' matmuls as GEMMs (8 rows per device)
    assert "cudnn" not in out.stdout  # attention over the cache is jaxchat's own (XLA), not the training kernel
    # the weights are replicated: a decode step moves at most a few per-row scalars between the 8 GPUs
    assert max(gathered_mib(out.stdout, "token") + gathered_mib(out.stdout, "call")) < 0.1, out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TPU_COMPILER, reason="the TPU compiler is not installed (pip install 'jaxchat[tpu]')")
def test_tpu_v5p_decoders_compile_and_gather_no_weights():
    out = run_python([*DECODERS, "--target=tpu-v5p"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("fits TPU v5p") == 4
    assert max(gathered_mib(out.stdout, "token") + gathered_mib(out.stdout, "call")) < 0.1, out.stdout
