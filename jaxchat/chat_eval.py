"""Evaluate a chat model: `python -m jaxchat.chat_eval -i sft [-a "ARC-Easy|GSM8K"] [-g d20] [-x 100]`; `-i mid,sft,rl`
evaluates several stages' models in turn.

Categorical tasks (ARC, MMLU) by the best answer letter after one forward pass, generative ones (GSM8K, HumanEval,
SpellingBee) by pass@k over `-n` samples through the engine (`task_eval.py` scores them). ChatCORE is computed only
when every task ran. A task whose data cannot be had (offline, say) is reported as skipped with the reason, never
as a zero. Results: a table on stdout and `$JAXCHAT_BASE_DIR/chat_eval/<source>_<tag>_<step>.json`.
"""
import argparse

import jax

from jaxchat.checkpoint_manager import SOURCE_DIRS, add_checkpoint_flags, load_model
from jaxchat.common import UserError, flag_adder, non_negative_float, number, positive_int
from jaxchat.distributed import run_main
from jaxchat.engine import Engine
from jaxchat.execution import add_sandbox_flag
from jaxchat.report_card import get_report, write_results
from jaxchat.run import make_mesh
from jaxchat.sampling import MAX_TOP_K
from jaxchat.task_eval import ALL_TASKS, EXTRA_TASKS, chatcore, run_chat_eval


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a jaxchat chat model.")
    add = flag_adder(p)
    add_checkpoint_flags(p, several_sources=True)
    add("task_name", "-a", default="",
        help=f"tasks split by | or , (default: ChatCORE's {', '.join(ALL_TASKS)}; also Arithmetic)")
    add("temperature", "-t", type=non_negative_float, default=0.0)
    add("max_new_tokens", "-m", type=positive_int, default=512)
    add("num_samples", "-n", type=positive_int, default=1, help="pass@n for generative tasks")
    add("top_k", "-k", type=number(int, 0, MAX_TOP_K), default=50, help="0: off")
    add("batch_size", "-b", type=positive_int, default=32, help="problems per forward / decode")
    add("max_problems", "-x", type=positive_int, default=None, help="default: all")
    add("mesh_data", type=positive_int, default=1)
    add_sandbox_flag(p)  # HumanEval runs the model's programs
    return p


def main(argv=None):
    """Evaluates each source of `-i` (e.g. `-i mid,sft,rl`, as a pipeline's report wants: a stage with no
    checkpoint is skipped, with the reason); returns the results of the last one evaluated."""
    args = build_parser().parse_args(argv)
    names = [t for t in args.task_name.replace(",", "|").split("|") if t] or ALL_TASKS
    if unknown := [t for t in names if t not in ALL_TASKS + EXTRA_TASKS]:
        raise UserError(f"unknown task(s) {unknown}; tasks: {', '.join(ALL_TASKS + EXTRA_TASKS)}")
    sources = [x for x in args.source.replace(",", "|").split("|") if x]
    if unknown := [x for x in sources if x not in SOURCE_DIRS]:
        raise UserError(f"-i: unknown source(s) {unknown}; sources: {', '.join(sorted(SOURCE_DIRS))}")
    with jax.set_mesh(make_mesh(args)):
        done = []
        for source in sources:
            try:
                model, tokenizer, meta = load_model(source, args.model_tag, args.step)
            except UserError as e:
                if len(sources) == 1:  # asked for this stage alone: its missing checkpoint is the error
                    raise
                print(f"\n{source}: skipped ({e})")  # a run that stopped early: the other stages still count
                continue
            done.append(evaluate(source, model, tokenizer, meta, names, args))
    if not done:
        raise UserError(f"-i {args.source}: none of these stages has a checkpoint to evaluate")
    return done[-1]


def evaluate(source, model, tokenizer, meta, names, args):
    engine = Engine(model, tokenizer)
    print(f"\n{source} {meta['model_tag']} step {meta['step']}")
    results, skipped = {}, {}
    for name in names:
        try:
            results[name] = run_chat_eval(name, model, tokenizer, engine, args.batch_size, args.num_samples,
                                          args.max_new_tokens, args.temperature, args.top_k, args.max_problems,
                                          sandbox=args.sandbox)
            print(f"{name}: {100 * results[name]:.2f}%")
        except UserError as e:  # its data (or HumanEval's sandbox) cannot be had: say so, never score 0
            skipped[name] = str(e)
            print(f"{name}: skipped ({e})")
    score = chatcore({t: results[t] for t in ALL_TASKS}) if all(t in results for t in ALL_TASKS) else None
    print(f"\n{'task':<16}{'accuracy':>10}")
    for name in names:
        print(f"{name:<16}{f'{100 * results[name]:.2f}%' if name in results else 'skipped':>10}")
    print(f"ChatCORE: {score:.4f}" if score is not None else
          f"ChatCORE: not computed (needs all of {', '.join(ALL_TASKS)}; missing: "
          f"{', '.join(t for t in ALL_TASKS if t not in results)})")
    out = {"source": source, "model_tag": meta["model_tag"], "step": meta["step"], "results": results,
           "skipped": skipped, "chatcore": score, "max_problems": args.max_problems, "num_samples": args.num_samples}
    write_results("chat_eval", f"{source}_{meta['model_tag']}_{meta['step']:06d}", out)
    get_report().log(f"Chat evaluation {source}", {
        "model": f"{source} {meta['model_tag']} step {meta['step']}",
        "settings": {k: getattr(args, k) for k in ("max_problems", "num_samples", "temperature", "max_new_tokens")},
        "results": results, "skipped": {k: v.splitlines()[0] for k, v in skipped.items()}, "ChatCORE": score})
    return out


if __name__ == "__main__":
    run_main(main)
