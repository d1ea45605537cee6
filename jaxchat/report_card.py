"""The report card of a run (its command: `python -m jaxchat.report reset|generate`).

Every stage records what it did with `get_report().log(title, data)`: its settings and results as JSON in
`$JAXCHAT_BASE_DIR/report/<slug>.json` (slug: the title in lower case, spaces as dashes). `reset` (the launcher
runs it before a pipeline) removes an earlier run's sections and records the header: git, hardware, software, lines
of code, the config that runs. `generate` (after it) renders `report/report.md` from those files alone: the header,
one section per stage in pipeline order, plots of each training stage's curves (from its TensorBoard events) beside
it as PNG files, and the summary: a metric × stage table, the total wall time and its cost. It copies report.md to
the working directory. The summary reads numbers, never text: a task that could not run shows as "skipped".
"""
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

from jaxchat import distributed
from jaxchat.common import UserError, get_base_dir, write_atomic

# nanochat's order: the sections of a pipeline as they happen; any other section follows, by time
ORDER = ["tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-evaluation", "midtraining",
         "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl"]
STAGE_COLUMNS = {"BASE": "base", "MID": "mid", "SFT": "sft", "RL": "rl"}  # summary column -> chat_eval --source
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]  # nanochat's rows
# The curves plotted per training stage, when it logged them (TensorBoard tags).
PLOTTED = ["train/loss", "val/bpb", "val/loss", "core_metric", "train/reward", "val/pass@1", "train/lrm"]
# Dollars per device-hour by device kind (nanochat's Lambda prices; other accelerators at its $2.00 default).
HOURLY_RATES = {"H100": 3.00, "A100": 1.79, "V100": 0.55, "cpu": 0.0}
DEFAULT_RATE = 2.00
SECTION_KEYS = ("title", "timestamp", "data")
HEADER_KEYS = ("timestamp", "config", "overrides", "commands", "command", "git", "hardware", "software", "code")
SOURCE_EXTENSIONS = (".py", ".md", ".rs", ".html", ".toml", ".sh", ".ipynb")  # what "lines of code" counts


def slugify(title):
    return title.lower().replace(" ", "-")


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


class Report:
    """Sections of one run in `report_dir`. Only the writing process (process 0) writes; the others' calls do
    nothing, so a stage calls `get_report().log(...)` on every process."""

    def __init__(self, report_dir):
        self.dir = report_dir

    def _write(self, name, record):
        if distributed.is_writer():
            os.makedirs(self.dir, exist_ok=True)
            write_atomic(os.path.join(self.dir, name), json.dumps(record, indent=1, default=str).encode())

    def log(self, title, data):
        """Record a stage's section: `data` is a dict of JSON values (nested dicts and lists of row dicts are
        rendered as lists and tables). Logging a title again replaces its section."""
        if not isinstance(data, dict):
            raise TypeError(f"report section {title!r}: data must be a dict, not {type(data).__name__}")
        self._write(slugify(title) + ".json", {"title": title, "timestamp": now(), "data": data})

    def reset(self, config=None, commands=(), overrides=()):
        """Forget the previous run's sections and record the header of a new one: the config, the overrides given
        on the command line, and the command of each stage (the config and the overrides merged)."""
        if not distributed.is_writer():
            return
        for path in glob.glob(os.path.join(self.dir, "*.json")) + glob.glob(os.path.join(self.dir, "*.png")):
            os.remove(path)
        self._write("header.json", {"timestamp": now(), "config": config, "overrides": list(overrides),
                                    "commands": list(commands), **environment()})

    def sections(self):
        """{slug: record} of the logged sections, in pipeline order."""
        records = {}
        for path in glob.glob(os.path.join(self.dir, "*.json")):
            slug = os.path.basename(path)[:-5]
            if slug != "header":
                records[slug] = _read(path, SECTION_KEYS)
        rank = lambda slug: (ORDER.index(slug), "") if slug in ORDER else (len(ORDER), records[slug]["timestamp"])
        return {slug: records[slug] for slug in sorted(records, key=rank)}

    def header(self):
        path = os.path.join(self.dir, "header.json")
        return _read(path, HEADER_KEYS) if os.path.exists(path) else None

    def generate(self, hourly_rate=None, copy_to="."):
        """Render report.md (and the plots) from the logged sections, and a copy in `copy_to` whose plot links
        point back here; returns (path, summary markdown). Process 0 only (the others get ("", ""))."""
        if not distributed.is_writer():
            return "", ""
        header, sections = self.header(), self.sections()
        summary = summary_markdown(header, sections, hourly_rate)
        os.makedirs(self.dir, exist_ok=True)
        parts, plots = [render_header(header, sections)], []
        for slug, record in sections.items():
            plot = plot_curves(record["data"].get("tensorboard"), os.path.join(self.dir, slug + ".png"))
            plots += [os.path.basename(plot)] if plot else []
            parts.append(render_section(record, plot and os.path.basename(plot)))
        parts.append(summary)
        text = "\n\n".join(parts) + "\n"
        path = os.path.join(self.dir, "report.md")
        write_atomic(path, text.encode())
        if copy_to is not None:
            for name in plots:
                text = text.replace(f"]({name})", f"]({os.path.join(os.path.abspath(self.dir), name)})")
            write_atomic(os.path.join(copy_to, "report.md"), text.encode())
        return path, summary


def _read(path, keys):
    """A record the report wrote, or one error line naming the file (a damaged file is never a traceback)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"report file {path} is unreadable ({e}): rerun its stage, or delete it") from None
    if not isinstance(record, dict) or any(k not in record for k in keys) or \
            not all(isinstance(record[k], dict) for k in keys if k in ("data", "git", "hardware", "software", "code")):
        raise UserError(f"report file {path} is not a report record (needs {', '.join(keys)}): rerun its stage, "
                        f"or delete it")
    return record


def get_report():
    return Report(os.path.join(get_base_dir(), "report"))


def write_results(subdir, name, results):
    """An evaluation's results as JSON in $JAXCHAT_BASE_DIR/<subdir>/<name>.json; says where and returns the path."""
    path = os.path.join(get_base_dir(), subdir, name + ".json")
    if distributed.is_writer():  # every process has the same results; one writes them
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(results, indent=2).encode())
        print(f"results written to {path}")
    return path


# --- the header: where and with what the run ran

def _git(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info():
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {"commit": "not a git checkout"}
    return {"branch": _git("rev-parse", "--abbrev-ref", "HEAD"), "commit": commit,
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "message": (_git("log", "-1", "--format=%s") or "")[:80]}


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def hardware():
    import jax
    devices = jax.devices()
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"platform": platform.platform(), "cpu": cpu_name() or platform.processor(), "cpu_count": os.cpu_count(),
            "memory_gib": memory and memory / 2**30, "backend": jax.default_backend(), "device_count": len(devices),
            "device_kind": devices[0].device_kind, "process_count": jax.process_count(),
            "device_memory_gib": limits[0] / 2**30 if all(limits) else None}


def software():
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tiktoken", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def code_size():
    """Characters, lines and files of jaxchat's own sources (git's tracked files where there is a checkout, else
    the installed package), and tokens ≈ characters / 4 (nanochat's "bloat")."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listed = _git("ls-files")
    paths = [os.path.join(root, p) for p in listed.splitlines()] if listed else \
        [os.path.join(d, f) for d, _, files in os.walk(os.path.dirname(os.path.abspath(__file__))) for f in files]
    chars = lines = files = 0
    for path in paths:
        if path.endswith(SOURCE_EXTENSIONS) and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            chars, lines, files = chars + len(text), lines + text.count("\n"), files + 1
    try:
        dependencies = len([r for r in importlib.metadata.requires("jaxchat") or [] if "extra ==" not in r])
    except importlib.metadata.PackageNotFoundError:
        dependencies = None
    return {"characters": chars, "lines": lines, "files": files, "tokens": chars // 4, "dependencies": dependencies}


def environment():
    return {"git": git_info(), "hardware": hardware(), "software": software(), "code": code_size(),
            "command": " ".join(["python"] + sys.orig_argv[1:])}


def hourly_rate(hw, rate=None):
    """(dollars per device-hour, where that number comes from)."""
    if rate is not None:
        return rate, "--gpu_hourly_rate"
    kind = hw["device_kind"] if hw["backend"] != "cpu" else "cpu"
    found = next((v for k, v in HOURLY_RATES.items() if k in kind), None)
    return (DEFAULT_RATE, f"no price known for {kind}: the ${DEFAULT_RATE:.2f} fallback") if found is None else \
        (found, f"default for {kind}")


# --- rendering

def fmt(value):
    """nanochat's style: floats to 4 decimals, large numbers with commas, the very large and the very small in
    scientific notation; None (not measured) as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) and abs(value) < 1e12:
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if abs(value) >= 1e12 or 0 < abs(value) < 1e-3:
        return f"{value:.4g}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def table(rows):
    """A markdown table of a list of dicts (columns: the union of their keys, in order of appearance)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "-")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_value(key, value, indent=""):
    if isinstance(value, dict) and len(value) > 8 and not any(isinstance(v, (dict, list)) for v in value.values()):
        return [f"{indent}- {key}: " + ", ".join(f"{k}={fmt(v)}" for k, v in value.items())]  # e.g. all of a stage's flags
    if isinstance(value, dict):
        return [f"{indent}- {key}:"] + [line for k, v in value.items() for line in render_value(k, v, indent + "  ")]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [f"{indent}- {key}:", "", table(value), ""]
    if isinstance(value, str) and "\n" in value:
        return [f"{indent}- {key}:", "", "```", value, "```", ""]
    if isinstance(value, list):
        return [f"{indent}- {key}: {', '.join(fmt(v) for v in value)}"]
    return [f"{indent}- {key}: {fmt(value)}"]


def render_section(record, plot=None):
    lines = [f"## {record['title']}", f"timestamp: {record['timestamp']}", ""]
    for key, value in record["data"].items():
        if key != "tensorboard":
            lines += render_value(key, value)
    if plot:
        lines += ["", f"![{record['title']}]({plot})"]
    return "\n".join(lines)


def render_header(header, sections):
    lines = ["# jaxchat training report", "", f"Generated: {now()}", ""]
    if header is None:
        return "\n".join(lines + ["(no header: `python -m jaxchat.report reset` records one before a run)"])
    git, hw, sw, code = header["git"], header["hardware"], header["software"], header["code"]
    lines += ["## Environment", "", "### Git"]
    lines += [f"- {k}: {fmt(v)}" for k, v in git.items()]
    lines += ["", "### Hardware", f"- platform: {hw['platform']}", f"- CPU: {hw['cpu']} ({hw['cpu_count']} cores)",
              f"- memory: {hw['memory_gib']:.1f} GiB" if hw.get("memory_gib") else "- memory: unknown",
              f"- devices: {hw['device_count']} × {hw['device_kind']} ({hw['backend']}"
              + (f", {hw['device_memory_gib']:.1f} GiB each" if hw.get("device_memory_gib") else "")
              + (f", {hw['process_count']} processes" if hw["process_count"] > 1 else "") + ")"]
    meshes = sorted({r["data"]["devices"] for r in sections.values() if "devices" in r["data"]})
    lines += [f"- mesh: {m}" for m in meshes]
    lines += ["", "### Software"] + [f"- {k}: {v}" for k, v in sw.items()]
    lines += ["", "### Code", f"- {code['characters']:,} characters, {code['lines']:,} lines, {code['files']} files, "
                              f"~{code['tokens']:,} tokens; {code['dependencies']} dependencies"]
    lines += ["", "### Run", f"- config: {header['config']}", f"- overrides: {' '.join(header['overrides']) or 'none'}",
              f"- command: `{header['command']}`"]
    if header["commands"]:
        lines += ["- stages:", "", "```"] + header["commands"] + ["```"]
    lines += ["", f"Run started: {header['timestamp']}"]
    return "\n".join(lines)


def eval_cell(section, task):
    if section is None:
        return "-"
    data = section["data"]
    if task in data.get("results", {}):
        return fmt(float(data["results"][task]))
    return "skipped" if task in data.get("skipped", {}) else "-"


def summary_markdown(header, sections, rate=None):
    """The summary: metric × BASE/MID/SFT/RL (skipped tasks as "skipped", stages that did not run as "-"), the
    total wall clock (from the header's start to the last section) and its cost."""
    evals = {col: sections.get(f"chat-evaluation-{src}") for col, src in STAGE_COLUMNS.items()}
    base = sections.get("base-model-evaluation")
    core = "-" if base is None else fmt(base["data"]["CORE"]) if "CORE" in base["data"] else \
        "skipped" if "CORE skipped" in base["data"] else "-"
    ran = {t for s in evals.values() if s for t in [*s["data"].get("results", {}), *s["data"].get("skipped", {})]}
    tasks = CHAT_TASKS + sorted(ran - set(CHAT_TASKS))
    rows = [["CORE", core, "-", "-", "-"]]
    rows += [[task] + [eval_cell(evals[col], task) for col in STAGE_COLUMNS] for task in tasks]
    # ChatCORE needs every task: where one was skipped, so is it
    rows += [["ChatCORE"] + ["-" if s is None else "skipped" if s["data"].get("ChatCORE") is None else
                             fmt(s["data"]["ChatCORE"]) for s in evals.values()]]
    lines = ["## Summary", "", "| Metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    stamps = [datetime.datetime.fromisoformat(r["timestamp"]) for r in sections.values()]
    if header is not None and stamps:
        seconds = (max(stamps) - datetime.datetime.fromisoformat(header["timestamp"])).total_seconds()
    else:  # no header: what the stages say they took
        seconds = sum(r["data"].get("wall time (s)", 0) for r in sections.values())
    since = "from Run started to the last section" if header is not None and stamps else \
        "the training stages' own wall times, summed"
    lines += ["", f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60)}m ({seconds:,.0f} s, "
                  f"{since})"]
    if header is not None:
        hw = header["hardware"]
        dollars, source = hourly_rate(hw, rate)
        cost = seconds / 3600 * dollars * hw["device_count"]
        lines += [f"Cost: ${cost:,.2f} ({hw['device_count']} × {hw['device_kind']} at ${dollars:.2f} per device-hour, "
                  f"{source})"]
    return "\n".join(lines)


# --- plots

def read_scalars(files):
    """{tag: {step: value}} of the TensorBoard event files matching the pattern `files` (the last value written
    wins for a step: a resumed run repeats the steps after its checkpoint)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    scalars = {}
    for path in sorted(glob.glob(files)):  # their names start with the time they were created
        for event in LegacyEventFileLoader(path).Load():
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def plot_curves(files, path):
    """One PNG of a training stage's curves (the PLOTTED tags its event `files` have), or None when none."""
    scalars = read_scalars(files) if files else {}
    tags = [t for t in PLOTTED if t in scalars]
    if not tags:
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tags), figsize=(4 * len(tags), 3), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        steps = sorted(scalars[tag])
        ax.plot(steps, [scalars[tag][s] for s in steps], marker="o" if len(steps) < 20 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
