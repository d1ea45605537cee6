"""The package's layout, read from its source with `ast` (the import graph imports nothing): a module is a command
exactly when it is listed in `jaxchat.COMMANDS`, the library never imports a command nor a command another, no
imports go in a circle, and the README's layout section lists the commands and the library as they are."""
import ast
import os
import re

import jaxchat

PACKAGE = os.path.dirname(os.path.abspath(jaxchat.__file__))
README = os.path.join(os.path.dirname(PACKAGE), "README.md")


def modules():
    """{dotted name: parsed source} of every module under jaxchat/ (a package as its `__init__`)."""
    found = {}
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].split(os.sep)
                name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    found[name] = ast.parse(fh.read(), f)
    return found


def is_main_guard(node):
    """`if __name__ == "__main__":` at the top level (a string holding those words, as the sandbox's child code
    does, is no guard)."""
    test = node.test if isinstance(node, ast.If) else None
    if not isinstance(test, ast.Compare) or len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = {ast.dump(test.left), ast.dump(test.comparators[0])}
    return sides == {ast.dump(ast.Name("__name__", ast.Load())), ast.dump(ast.Constant("__main__"))}


def command_name(module, tree):
    """The `python -m jaxchat.<name>` name of a command module, else None: a module with a main guard, or the
    `__main__` of a package (the command is then the package)."""
    if module.endswith(".__main__"):
        return module.removeprefix("jaxchat.").removesuffix(".__main__")
    if any(is_main_guard(node) for node in tree.body):
        return module.removeprefix("jaxchat.")
    return None


def imports(module, tree, known):
    """The jaxchat modules `module` imports anywhere in its source (inside functions too: an import there still
    ties the two together)."""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:  # `from jaxchat import engine` imports a module; `from jaxchat.run import x` a name
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != module}


MODULES = modules()
PACKAGES = {m for m in MODULES if os.path.isdir(os.path.join(PACKAGE, *m.split(".")[1:]))}
COMMANDS = {m: name for m, tree in MODULES.items() if (name := command_name(m, tree))}
GRAPH = {m: imports(m, tree, MODULES) for m, tree in MODULES.items()}


def test_a_module_is_a_command_exactly_when_listed():
    assert sorted(COMMANDS.values()) == sorted(jaxchat.COMMANDS)
    assert len(set(jaxchat.COMMANDS)) == len(jaxchat.COMMANDS)


def test_the_launchers_stages_are_commands():
    from jaxchat.pipeline import STAGES  # the one place the library loads commands: by these names
    assert {m.removeprefix("jaxchat.") for m in STAGES.values()} <= set(jaxchat.COMMANDS)


def test_the_library_never_imports_a_command():
    wrong = sorted(f"{m} imports {c}" for m, deps in GRAPH.items() if m not in COMMANDS for c in deps if c in COMMANDS)
    assert not wrong, "library modules import commands (move what they share into the library):\n" + "\n".join(wrong)


def test_commands_never_import_each_other():
    wrong = sorted(f"{m} imports {c}" for m in COMMANDS for c in GRAPH[m] if c in COMMANDS)
    assert not wrong, "commands import commands (move what they share into the library):\n" + "\n".join(wrong)


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None (depth-first search; grey = on the current path)."""
    state, path = {}, []

    def visit(m):
        state[m] = "grey"
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "grey":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[m] = "black"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def readme_names(kind):
    """The backquoted names of the README layout section's paragraph that starts with **kind**, leaving out what
    is said in parentheses (descriptions)."""
    with open(README, encoding="utf-8") as f:
        layout = f.read().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    text = next(p for p in layout.split("\n\n") if p.startswith(f"**{kind}**"))
    while (shorter := re.sub(r"\([^()]*\)", "", text)) != text:
        text = shorter
    return set(re.findall(r"`([^`]+)`", text.split(":", 1)[1]))


def test_the_readme_lists_the_commands_and_the_library():
    assert readme_names("Commands") == set(jaxchat.COMMANDS)
    # the library: every top-level module, and each subpackage as `name/`
    library = {m.split(".")[1] + ("/" if m.count(".") > 1 or m in PACKAGES else "")
               for m in MODULES if m != "jaxchat" and m not in COMMANDS}
    assert readme_names("Library") == library
