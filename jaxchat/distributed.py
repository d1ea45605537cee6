"""How every command starts, and many processes running one program: the one writer, barriers, failing fast.

`run_main(main)` starts every command: the GPU settings (GPU_ENV, GPU_XLA_FLAGS) before JAX starts its backend,
`jax.distributed` from the flags below, XLA's compilation cache, then main(argv); bad input is one error line.

One process per host drives all of that host's devices; together the processes run one SPMD program over the
global mesh (every stage's `make_mesh` covers `jax.devices()`, all hosts' devices). Every stage and the launcher
take the start-up flags, or the same settings from the environment (a flag wins):

    --coordinator=HOST:PORT   JAXCHAT_COORDINATOR     process 0's host and a free port, the same on every process;
                                                      "auto": JAX detects the cluster (TPU pod slices; SLURM or
                                                      Open MPI with one process per device)
    --num_processes=N         JAXCHAT_NUM_PROCESSES   how many processes take part
    --process_id=I            JAXCHAT_PROCESS_ID      this one, 0 ... N-1 (0 writes the files)
    --distributed_timeout=S   JAXCHAT_DISTRIBUTED_TIMEOUT  seconds after which a silent peer counts as dead

None given: one process, unless SLURM or Open MPI started several (then "auto"). A process that fails prints its
error and exits at once with a non-zero code (`run_main`): its peers see it stop heart-beating and abort within the
timeout, instead of waiting in a collective that will never complete.
"""
import argparse
import functools
import importlib.util
import itertools
import json
import os
import sys
import traceback

from jaxchat.common import UserError, get_base_dir
from jaxchat.hardware import GPU_MEM_FRACTION

DEFAULT_TIMEOUT = 60  # seconds: long enough for a slow step's silence, short enough to stop a broken job promptly
START_TIMEOUT = 300  # seconds for every process to join: nodes of a cluster job start at different moments
BARRIER_TIMEOUT = 24 * 3600  # the writer may download data or train a tokenizer meanwhile; a dead peer ends it sooner

_process = {"index": 0, "count": 1}
_barriers = itertools.count()  # every process passes the same barriers in the same order: ids agree


def add_flags(parser):
    parser.add_argument("--coordinator", default=os.environ.get("JAXCHAT_COORDINATOR", ""),
                        help="HOST:PORT of process 0 (or 'auto'): start jax.distributed")
    parser.add_argument("--num_processes", "--num-processes", type=int,
                        default=int(os.environ.get("JAXCHAT_NUM_PROCESSES", 0)), help="processes taking part")
    parser.add_argument("--process_id", "--process-id", type=int, default=int(os.environ.get("JAXCHAT_PROCESS_ID", -1)),
                        help="this process's index, 0 ... num_processes - 1")
    parser.add_argument("--distributed_timeout", "--distributed-timeout", type=int,
                        default=int(os.environ.get("JAXCHAT_DISTRIBUTED_TIMEOUT", DEFAULT_TIMEOUT)),
                        help="seconds of silence after which a peer counts as dead (heartbeat and shutdown)")


def _cluster_started_several():
    """SLURM or Open MPI launched this as one of several tasks: JAX's cluster detection knows the rest."""
    counts = (os.environ.get("SLURM_STEP_NUM_TASKS") if "SLURM_PROCID" in os.environ else None,
              os.environ.get("OMPI_COMM_WORLD_SIZE"))
    return any(c and int(c) > 1 for c in counts)


def initialize(argv):
    """Start jax.distributed from the start-up flags in `argv` (and the environment) before anything starts a JAX
    backend; returns the other arguments. One process: nothing is started."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser)
    args, rest = parser.parse_known_args(argv)
    nothing_given = not args.coordinator and args.num_processes <= 1
    auto = args.coordinator == "auto" or (nothing_given and _cluster_started_several())
    if nothing_given and not auto:
        return rest
    if not auto and not (args.coordinator and args.num_processes >= 1 and 0 <= args.process_id < args.num_processes):
        raise UserError(f"several processes need --coordinator=HOST:PORT, --num_processes=N and --process_id in "
                        f"0..N-1 (got coordinator {args.coordinator!r}, num_processes {args.num_processes}, "
                        f"process_id {args.process_id})")
    import jax
    # Settings given: JAX must not detect a cluster on top of them (under SLURM it would give this process the one
    # GPU numbered SLURM_LOCALID instead of all of its host's).
    given = {} if auto else {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
                             "process_id": args.process_id, "cluster_detection_method": "deactivate"}
    try:
        jax.distributed.initialize(**given, heartbeat_timeout_seconds=args.distributed_timeout,
                                   shutdown_timeout_seconds=args.distributed_timeout,
                                   initialization_timeout=max(START_TIMEOUT, args.distributed_timeout))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"jax.distributed could not start ({str(e).splitlines()[0]})") from None
    _process.update(index=jax.process_index(), count=jax.process_count())
    if not is_writer():  # one voice: process 0 prints and shows progress; every process's errors still show
        import tqdm
        sys.stdout = open(os.devnull, "w")
        shown = tqdm.tqdm.__init__

        def hidden(self, *args, **kwargs):
            shown(self, *args, **{**kwargs, "disable": True})  # even where a caller passes disable=
        tqdm.tqdm.__init__ = hidden
    return rest


def process_index():
    return _process["index"]


def process_count():
    return _process["count"]


def is_writer():
    """Process 0 writes every shared file (tokenizer, data, logs, TensorBoard, eval results, report)."""
    return _process["index"] == 0


def _client():
    # The coordination service that jax.distributed started: its barrier and key-value store wait as long as asked
    # (a device collective would time out while process 0 trains a tokenizer). JAX exposes it only here.
    from jax._src.distributed import global_state
    return global_state.client


def barrier(name, timeout=BARRIER_TIMEOUT):
    """Wait until every process gets here (nothing with one process)."""
    if process_count() > 1:
        _client().wait_at_barrier(f"jaxchat/{name}/{next(_barriers)}", int(timeout * 1000))


def all_gather_json(name, value, timeout=BARRIER_TIMEOUT):
    """[value of process 0, value of process 1, ...]: every process gets every process's JSON-able value."""
    if process_count() == 1:
        return [value]
    client, key = _client(), f"jaxchat/{name}/{next(_barriers)}"
    client.key_value_set(f"{key}/{process_index()}", json.dumps(value))
    values = [json.loads(client.blocking_key_value_get(f"{key}/{p}", int(timeout * 1000)))
              for p in range(process_count())]
    barrier(f"{name}/read")  # everyone has read every value: each process removes its own
    client.key_value_delete(f"{key}/{process_index()}")
    return values


def everyone(name, ok):
    """True when `ok` holds on every process: a decision that changes what runs next (skip a task whose data
    could not be had, fall back to other data) must be the same everywhere, or the processes run different
    collectives and wait for each other forever."""
    return all(all_gather_json(name, bool(ok)))


def writer_first(name, fn):
    """fn() on process 0, then on the others: it makes a shared file (a download) that they then find on disk."""
    if is_writer():
        try:
            return fn()
        finally:  # an error the caller handles (a bundle missing) must not leave the others waiting
            barrier(name)
    barrier(name)
    return fn()


def one_writer(main):
    """A stage that only writes shared files (data, tokenizer): process 0 runs it, the others wait for it."""
    @functools.wraps(main)
    def run(argv=None):
        result = main(argv) if is_writer() else None
        barrier(main.__module__)
        return result
    return run


def exit_now(message, code=1):
    """End this process: with peers, at once (os._exit) so they notice within the timeout; alone, via sys.exit."""
    if process_count() == 1:
        sys.exit(message)
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def use_compilation_cache():
    """Keep XLA's compiled programs in $JAXCHAT_BASE_DIR/xla_cache, so a stage run again loads them instead of
    compiling. A cache set by JAX_COMPILATION_CACHE_DIR wins; JAXCHAT_XLA_CACHE=0 turns it off. Stages that never
    import jax (data, tokenizer) are left alone: importing it would only slow their start."""
    jax = sys.modules.get("jax")
    if jax is None or os.environ.get("JAXCHAT_XLA_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(get_base_dir(create=False), "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Set on GPU machines before JAX starts its backend (each can be overridden from the environment). XLA takes
# GPU_MEM_FRACTION of the card up front; the latency-hiding scheduler overlaps FSDP's all-gathers and reduce-scatters
# with the matmuls, and combine thresholds above one layer's weights let it gather a layer in one collective.
GPU_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(GPU_MEM_FRACTION), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",
                 "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
                 "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
                 "--xla_gpu_all_reduce_combine_threshold_bytes=134217728")


def configure_accelerator():
    """GPU_ENV and GPU_XLA_FLAGS when JAX's CUDA plugin is installed; a flag the user already set in XLA_FLAGS
    wins. Nothing on CPU or TPU machines."""
    if not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return
    for key, value in GPU_ENV.items():
        os.environ.setdefault(key, value)
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def run_main(main):
    """Entry point of a command: set up the accelerator, start jax.distributed when asked, run main(argv); bad
    user input ends with one 'error: ...' line, not a traceback. With several processes any failure ends this
    process at once, so that its peers stop within the distributed timeout instead of waiting for it."""
    configure_accelerator()
    try:
        argv = initialize(sys.argv[1:])
        use_compilation_cache()
        main(argv)
    except UserError as e:
        exit_now(f"error: {e}")
    except BaseException as e:
        if process_count() == 1 or isinstance(e, SystemExit) and not e.code:
            raise
        if not isinstance(e, SystemExit):  # argparse has printed its own message
            traceback.print_exc()
        exit_now(f"error: process {process_index()} of {process_count()} failed; stopping")
