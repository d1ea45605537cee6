"""Models to and from Hugging Face transformers (`jaxchat.hf.convert` does the work).

    python -m jaxchat.hf export -i sft -g d20 [-s STEP] --out DIR     # a jaxchat checkpoint -> DIR
    python -m jaxchat.hf import DIR -g d20 [--source sft]              # DIR -> a jaxchat checkpoint
    python -m jaxchat.hf import --repo karpathy/nanochat-d32 -g d32    # from the Hub, through the Hugging Face cache
"""
import argparse

from jaxchat.checkpoint_manager import SOURCE_DIRS, add_checkpoint_flags
from jaxchat.common import SWITCH, UserError, flag_adder, non_negative_int
from jaxchat.distributed import run_main
from jaxchat.hf.convert import EXPORT_DTYPES, download_model, export, import_model


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jaxchat.hf", description="models to and from Hugging Face transformers")
    commands = p.add_subparsers(dest="command", required=True)
    e = commands.add_parser("export", help="a jaxchat checkpoint as a transformers model directory")
    add_checkpoint_flags(e)
    e.add_argument("--out", required=True, help="the directory to write")
    e.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES), help="of the saved weights")
    flag_adder(e)("overwrite", **SWITCH, default=0, help="1: write over a non-empty --out")
    i = commands.add_parser("import", help="a transformers NanoChat model as a jaxchat checkpoint")
    add = flag_adder(i)
    i.add_argument("directory", nargs="?", help="a local model directory: transformers', or nanochat's checkpoint files")
    add("repo", default=None, help="download owner/name from the Hugging Face Hub")
    add("revision", default="main", help="with --repo: a branch, tag, commit or refs/pr/N")
    add("model_tag", "-g", default=None, help="default: d<number of layers>")
    add("source", "-i", default="sft", choices=sorted(SOURCE_DIRS), help="which stage to import as")
    add("step", "-s", type=non_negative_int, default=None, help="of nanochat's own checkpoint files: default the last")
    add("overwrite", **SWITCH, default=0, help="1: replace checkpoints already under the tag")
    args = p.parse_args(argv)
    if args.command == "export":
        export(args.source, args.model_tag, args.step, args.out, args.dtype, bool(args.overwrite))
        return
    if (args.directory is None) == (args.repo is None):
        raise UserError("import takes a model directory or --repo owner/name (one of them)")
    directory, origin = (args.directory, None) if args.repo is None else \
        download_model(args.repo, args.revision, args.step)
    import_model(directory, args.model_tag, args.source, bool(args.overwrite), origin, args.step)


if __name__ == "__main__":
    run_main(main)
