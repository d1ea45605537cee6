"""jaxchat: train your own small ChatGPT from scratch in JAX/Flax NNX.

Two kinds of module. Commands run as `python -m jaxchat.<name>`; COMMANDS lists every one of them (a package is a
command through its `__main__.py`). Every other module is the library: the commands import it, and it never imports
a command. tests/test_layout.py holds the package to that, and to imports that never go in a circle.
"""

# the pipeline's stages in order, then the tools around them; `data.*` rebuild the files shipped in jaxchat/data/
COMMANDS = ("dataset", "tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_sft", "chat_rl",
            "chat_eval", "chat_cli", "chat_web", "report", "launch", "memory", "hf", "data.make_default_corpus",
            "data.make_identity")
