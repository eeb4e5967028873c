"""What README.md, deploy/README.md and deploy/annotator.example.toml tell a user exists.

A user follows the docs on their box: every ``annotator <command> [<sub>] --flag`` they show must
parse with the real argparse parsers (``service.cli.build_parser``, subcommands of the other
packages included), every config key they name (``[section] key``, ``section.key``,
``ANNOTATOR_<SECTION>__<KEY>``) must be a key of the daemon's schema (``service.config.KEYS``) or
of the sync agent's tables (``sync.config``, ``sync.*_settings``), every ``annotator_*`` metric
must be one the endpoints expose (``service.metrics``), and every repository path must exist.
The defaults the docs state are checked against the code's, and every key of the example
configuration, commented out or not, is uncommented one at a time and read by the real loaders.

The mentions are found with regular expressions, so a rename in the code without the docs (or
the reverse) fails here. ``NOT_LITERAL`` lists the few mentions that are not meant as such, each
with its reason.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import re
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "deploy/README.md", "deploy/annotator.example.toml")

# Mentions that look like what this file checks but are not meant literally (mention -> reason).
NOT_LITERAL = {
    # flags of other programs shown in the docs
    "--no-deps": "pip's flag (training install)",
    "--force-reinstall": "pip's flag",
    "--gpu": "deploy/install.sh's flag",
    "--with-sync": "deploy/install.sh's flag",
    "--purge": "deploy/uninstall.sh's flag",
    "--build-arg": "docker build's flag",
    "--exclude": "rsync's flag (backups)",
    # dotted names that start like a config section but are something else
    "sync.lock": "a lock file in the store root",
}
# (a dotted span is a config key only when it starts with a table of SCHEMA: service.x,
# bundle.json, fs.inotify... are not)
NOT_A_REPO_PATH = ("../shared/",)  # outside the repository (the development machine's data)


# -- reading the docs -----------------------------------------------------------------------
def doc_text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def code_spans(name: str) -> Iterator[tuple[str, str]]:
    """(span, the line or table row it is in) for every inline `code` span and every line of a
    fenced block (shell comments cut off); for the TOML file, every comment line."""
    text = doc_text(name)
    if name.endswith(".toml"):
        for line in text.splitlines():
            body = line.lstrip()
            if body.startswith("#"):
                body = body.lstrip("# ")
                yield body, body
            elif "#" in body:
                yield body.split("#", 1)[1], body
        return
    fenced = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
    for lang, block in fenced.findall(text):
        if not lang:  # the README's diagram
            continue
        for line in block.splitlines():
            line = re.split(r"\s+#\s", line, maxsplit=1)[0]
            yield line, line
    prose = fenced.sub("", text)
    for para in re.split(r"\n\s*\n", prose):
        lines = para.splitlines()
        for m in re.finditer(r"`([^`]+)`", para):
            start = para.count("\n", 0, m.start())
            yield m.group(1).replace("\n", " "), lines[start]


# -- 1. commands and flags ------------------------------------------------------------------
def parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    from service.cli import build_parser

    out: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        out[path] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, path + (name,))
    walk(build_parser(), ())
    return out


PARSERS = parsers()
COMMANDS = {path[0] for path in PARSERS if path}
GROUPS = {path[0] for path in PARSERS if len(path) == 2}  # dataset, models


def flags_of(path: tuple[str, ...]) -> set[str]:
    return {o for a in PARSERS[path]._actions for o in a.option_strings}


ALL_FLAGS = set().union(*(flags_of(p) for p in PARSERS))
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
STOP = re.compile(r"\s(?:\||&&|;|#|>)\s|\)|$")


def command_mentions(name: str) -> Iterator[tuple[tuple[str, ...], list[str], str]]:
    """((command[, sub]), flags, text) for each `annotator CMD ...` in the doc's code spans; a
    span of a group's subcommand (`dataset export --propagate`, `models clean-registry`) and the
    continuation spans of a table row (`annotator models list` / `pull [--once]`) count too."""
    for span, line in code_spans(name):
        group = None
        for m in re.finditer(r"annotator\s+(?:models|dataset)\b", line):
            group = m.group(0).split()[-1]
        for m in re.finditer(r"(?:(?<![\w.-])(?<!-u )annotator\s+|^(?=(?:dataset|models)\s))([a-z][a-z0-9-]*)(.*)", span):
            cmd, rest = m.group(1), STOP.split(m.group(2), maxsplit=1)[0]
            path: tuple[str, ...] = (cmd,)
            words = rest.split()
            if cmd in GROUPS and words and (cmd, words[0]) in PARSERS:
                path = (cmd, words[0])
            yield path, FLAG.findall(rest), f"{name}: `{span.strip()}`"
        if group and (first := span.split()[0] if span.split() else "") and (group, first) in PARSERS \
                and not span.startswith(("annotator", group)):
            yield (group, first), FLAG.findall(span), f"{name}: `{span.strip()}` ({group})"


def table_row_command(line: str) -> tuple[str, ...] | None:
    """The command a README table row's first cell names (`| `annotator evaluate BUNDLE ...` |`)."""
    m = re.match(r"\|\s*`annotator\s+([a-z][a-z0-9-]*)", line)
    return (m.group(1),) if m and (m.group(1),) in PARSERS else None


def test_every_command_and_flag_the_docs_show_exists() -> None:
    wrong, checked = [], 0
    for name in DOCS:
        for path, flags, where in command_mentions(name):
            if path not in PARSERS:
                # prose like "the annotator user" is not a command: only words followed by a
                # flag or shown in a command table count as one
                if flags or "|" in where:
                    wrong.append(f"{where}: no command `annotator {' '.join(path)}`")
                continue
            own = flags_of(path)
            for flag in flags:
                checked += 1
                if flag not in own:
                    wrong.append(f"{where}: `annotator {' '.join(path)}` has no {flag}")
    # standalone flags: in a command table's row, that row's command has it; elsewhere some
    # annotator command has it (or it is another program's, NOT_LITERAL)
    for name in DOCS:
        for span, line in code_spans(name):
            if "annotator" in span or re.match(r"(dataset|models)\s", span):
                continue
            row = table_row_command(line)
            for flag in FLAG.findall(span):
                checked += 1
                if row is not None and row in PARSERS and flag not in flags_of(row):
                    group_flags = set().union(*(flags_of(p) for p in PARSERS if p[:1] == row))
                    if flag not in group_flags:
                        wrong.append(f"{name}: `{span}` in the row of `annotator {row[0]}`: no such flag")
                elif flag not in ALL_FLAGS and flag not in NOT_LITERAL:
                    wrong.append(f"{name}: `{span}`: no annotator command has {flag}")
    assert checked > 100, checked
    assert not wrong, "\n".join(wrong)


def test_every_command_the_readme_table_lists_is_a_command() -> None:
    rows = [table_row_command(line) or line for line in doc_text("README.md").splitlines()
            if line.startswith("| `annotator ")]
    assert len(rows) > 15
    assert all(isinstance(r, tuple) for r in rows), [r for r in rows if not isinstance(r, tuple)]
    listed = {r[0] for r in rows} | {"healthcheck", "doctor"}  # "`annotator status` / `healthcheck` / `doctor`"
    hidden = COMMANDS - listed
    assert not hidden, f"commands the README's table does not list: {sorted(hidden)}"


def default_of(path: tuple[str, ...], dest: str) -> Any:
    for a in PARSERS[path]._actions:
        if a.dest == dest:
            return a.default
    raise AssertionError(f"annotator {' '.join(path)}: no option {dest}")


# (doc, a phrase the doc states, the code's value, what the phrase says it is)
def stated_defaults() -> list[tuple[str, str, Any, Any]]:
    from service import systemd
    from service.config import Config
    from service.server import MAX_PAGE_SIZE

    cfg = Config()
    sim = ("simulate",)
    return [
        ("README.md", "(`--motion`, default 10 % of its", default_of(("synth",), "motion"), 0.1),
        ("README.md", "`annotator train`\n  trains those images at `--propagated-weight` (default 1",
         default_of(("train",), "propagated_weight"), 1.0),
        ("README.md", "activation ranges measured on up to 200 of your images", default_of(("quantize",), "count"), 200),
        ("README.md", "`engine.letterbox = \"rect\"` (default `square`)", cfg.engine.letterbox, "square"),
        ("README.md", "`annotator evaluate --letterbox rect`", default_of(("evaluate",), "letterbox"), "square"),
        ("README.md", "the last `judge.review_window` (500) images", cfg.judge.review_window, 500),
        ("README.md", "`page_size` 0 (100) to\n1000", MAX_PAGE_SIZE, 1000),
        ("README.md", "(`EXTEND_TIMEOUT_USEC`, every 20 s)", systemd.EXTEND_EVERY_S, 20.0),
        ("README.md", "It listens on\n`127.0.0.1:50051`", cfg.server.listen, "127.0.0.1:50051"),
        ("README.md", "keep `engine.workers = 2` and `engine.threads = 0` (the defaults",
         (cfg.engine.workers, cfg.engine.threads), (2, 0)),
        ("README.md", "So `engine.run_batch = 0` (the default", cfg.engine.run_batch, 0),
        ("README.md", "a pool of 800 synthetic images", default_of(sim, "pool"), 800),
        ("README.md", "(80 capture\nsequences of 10 frames", default_of(sim, "frames"), 10),
        ("README.md", "on 40 random images of the *source* domain", default_of(sim, "initial"), 40),
        ("README.md", "test set (150 independent scenes)", default_of(sim, "test"), 150),
        ("README.md", "at `--auto-weight 0.25`", default_of(sim, "auto_weight"), 0.25),
        ("README.md", "# the default: 3 seeds, 2 rounds of 40",
         (default_of(sim, "seeds"), default_of(sim, "rounds"), default_of(sim, "per_round")), (3, 2, 40)),
        ("README.md", "`judge_audit` (the judge plus 10 % seeded random audit picks",
         default_of(sim, "audit_fraction"), 0.1),
        ("README.md", "(a nano pose model, 256 px,\n  3 epochs a round)",
         (default_of(sim, "imgsz"), default_of(sim, "epochs")), (256, 3)),
        ("README.md", "(12 epochs each,\n320 px, batch 16",
         (default_of(("learning-curve",), "epochs"), default_of(("learning-curve",), "imgsz"),
          default_of(("train",), "batch")), (12, 320, 16)),
        ("deploy/README.md", "`engine.stall_seconds` (1800 s;", cfg.engine.stall_seconds, 1800.0),
        ("deploy/README.md", "(`[sync.models] root`, default `<store root>/models`)", None, None),
    ]


@pytest.mark.parametrize("doc,phrase,code,stated", stated_defaults(), ids=lambda v: str(v)[:40])
def test_stated_defaults_are_the_codes(doc: str, phrase: str, code: Any, stated: Any) -> None:
    text = re.sub(r"\s+", " ", doc_text(doc))
    assert re.sub(r"\s+", " ", phrase) in text, f"{doc} no longer says {phrase!r}: update this test's table"
    assert code == stated, f"{doc} says {phrase!r}, the code's default is {code!r}"


def test_sync_defaults_the_docs_state(tmp_path: Path) -> None:
    """`[sync.models] root` and `[sync.dataset] root` default under the store root, as deploy/README.md
    and the example say; the gate's and the dataset's defaults are the example's."""
    from sync.pull_settings import settings_from

    s = settings_from(tmp_path / "store", {}, tmp_path)
    assert s.models_root == tmp_path / "store" / "models"
    assert s.dataset_root == tmp_path / "store" / "dataset"


# -- 2. config keys -------------------------------------------------------------------------
def schema() -> dict[str, set[str]]:
    """Table -> its keys, as the loaders know them (subtables listed as tables, not keys)."""
    from service.config import KEYS
    from sync import config as sc, pull_settings as ps, review_settings as rs, training_settings as ts
    from exporter.sagemaker_entry import HYPERPARAMETERS

    tables: dict[str, set[str]] = {}
    for key in KEYS:
        section, _, leaf = key.partition(".")
        tables.setdefault(section, set()).add(leaf)

    def plain(keys: Any) -> set[str]:
        return {k for k, t in dict.fromkeys(keys, None).items()} if not isinstance(keys, dict) else \
            {k for k, t in keys.items() if t is not dict}
    tables["sync"] = plain(sc._SYNC_KEYS)
    tables["sync.target"] = plain(sc._TARGET_KEYS)
    tables["sync.review"] = plain(rs._REVIEW_KEYS)
    tables["sync.review.groundtruth"] = plain(rs._GT_KEYS)
    tables["sync.review.groundtruth.job"] = plain(rs._JOB_TYPES)
    tables["sync.review.labelstudio"] = plain(rs._LS_KEYS)
    tables["sync.dataset"] = plain(ps._DATASET_KEYS)
    tables["sync.models"] = plain(ps._MODELS_KEYS)
    tables["sync.models.registry"] = plain(sc._TARGET_KEYS)
    tables["sync.training"] = plain(ts._KEYS)
    tables["sync.training.hyperparameters"] = set(HYPERPARAMETERS)
    assert set(rs._REVIEW_KEYS) - tables["sync.review"] == {"groundtruth", "labelstudio"}
    return tables


SCHEMA = schema()


def key_mentions(name: str) -> Iterator[tuple[str, str | None, str]]:
    """(table, key or None, where) for `[table] key`, `[table]`, `section.key` and
    `ANNOTATOR_SECTION__KEY` in the doc's code spans (and its prose for `[table] key`)."""
    text = doc_text(name)
    if name.endswith(".toml"):
        text = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    # `[table] key` and `[table]\nkey` (a span cut by the line end)
    for m in re.finditer(r"`\[([a-z_.]+)\](?:\s+([a-z_]+))?", text):
        yield m.group(1), m.group(2), f"{name}: `[{m.group(1)}]{' ' + m.group(2) if m.group(2) else ''}`"
    for span, _ in code_spans(name):
        for m in re.finditer(r"(?<![\w./$<-])([a-z_]+(?:\.[a-z_]+)+)(?![\w(/-])", span):
            dotted = m.group(1)
            table, _, leaf = dotted.rpartition(".")
            if dotted in NOT_LITERAL or table.partition(".")[0] not in SCHEMA and table not in SCHEMA:
                continue
            yield table, leaf, f"{name}: `{span.strip()}`"
        for m in re.finditer(r"ANNOTATOR_([A-Z_]+?)__([A-Z_]+)\b", span):
            yield m.group(1).lower(), m.group(2).lower(), f"{name}: `{m.group(0)}`"


def test_every_config_key_the_docs_name_exists() -> None:
    wrong, checked = [], 0
    for name in DOCS:
        for table, key, where in key_mentions(name):
            checked += 1
            if table in SCHEMA and (key is None or key in SCHEMA[table]):
                continue
            if key is not None and f"{table}.{key}" in SCHEMA:  # `[sync.models.registry]` as a dotted name
                continue
            if table == "sync" and key == "*":
                continue
            wrong.append(f"{where}: no key {key!r} in [{table}]" if table in SCHEMA else f"{where}: no table [{table}]")
    assert checked > 60, checked
    assert not wrong, "\n".join(wrong)


def example_lines() -> list[str]:
    return doc_text("deploy/annotator.example.toml").splitlines()


def example_variants() -> Iterator[tuple[str, str | None, str, str]]:
    """(table, key or None for a table header, the uncommented line, the example with that line
    uncommented, with its commented table header uncommented and a live value of the same key
    commented out): one variant per commented key or table of the example."""
    lines = example_lines()
    table, header_at, live = "", None, {}
    for i, line in enumerate(lines):
        if m := re.match(r"#?\s*\[([a-z_.]+)\]", line):
            table, header_at = m.group(1), i if line.startswith("#") else None
            if not line.startswith("#"):
                continue
        elif m := re.match(r"([a-z0-9_]+)\s*=", line):
            live[(table, m.group(1))] = i
            continue
        m = re.match(r"#\s*([a-z0-9_]+\s*=.*|\[[a-z_.]+\].*)$", line)
        if not m:
            continue
        key = None if m.group(1).startswith("[") else m.group(1).split("=")[0].strip()
        new = list(lines)
        new[i] = m.group(1)
        if header_at is not None and header_at != i:
            new[header_at] = re.sub(r"^#\s*", "", lines[header_at])
        if (table, key) in live:
            new[live[(table, key)]] = "# " + lines[live[(table, key)]]
        yield table, key, m.group(1), "\n".join(new) + "\n"


def test_the_example_config_lists_every_key_with_the_codes_default(tmp_path: Path) -> None:
    """Every daemon key is in the example (commented or not) and every uncommented value is the
    code's default; every `[sync.*]` table's keys too."""
    from service.config import KEYS, Config

    text = doc_text("deploy/annotator.example.toml")
    uncommented = "\n".join(re.sub(r"^#\s?(?=[a-z0-9_]+\s*=|\[)", "", line) for line in text.splitlines())
    doc = tomllib.loads(uncommented.replace("listen = \"127.0.0.1:9464\"", ""))
    cfg = Config().to_dict()
    missing, differ = [], []
    for key in KEYS:
        section, _, leaf = key.partition(".")
        if leaf not in doc.get(section, {}):
            missing.append(key)
    live = tomllib.loads(text)
    for section, values in live.items():
        if section == "sync":
            continue
        for leaf, value in values.items():
            code = cfg[section][leaf]
            if code != value:
                differ.append(f"{section}.{leaf}: example {value!r}, code {code!r}")

    def keys(t: dict, prefix: str) -> Iterator[str]:
        for k, v in t.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}.{k}")
            else:
                yield f"{prefix}.{k}"
    documented = set(keys(doc["sync"], "sync"))
    for table, leaves in SCHEMA.items():
        if table.startswith("sync") and table != "sync.training.hyperparameters":
            missing += [f"{table}.{k}" for k in leaves if f"{table}.{k}" not in documented]
    assert not missing, f"keys the example does not document: {missing}"
    assert not differ, "\n".join(differ)


def test_the_example_sync_values_are_the_codes_defaults(tmp_path: Path) -> None:
    from sync.agent import validated_settings
    from sync.config import SyncConfig, TargetConfig, load_sync_config
    from sync.training_settings import TrainingSettings

    live = tomllib.loads(doc_text("deploy/annotator.example.toml"))["sync"]
    cfg = load_sync_config(ROOT / "deploy/annotator.example.toml", env={})
    review, pull, _ = validated_settings(cfg, env={})
    got = {"sync": {k: getattr(cfg, k) for k in live if not isinstance(live[k], dict)},
           "sync.target": {k: getattr(cfg.target, k) for k in live["target"]},
           "sync.review": {k: getattr(review, k) for k in live["review"] if not isinstance(live["review"][k], dict)},
           "sync.dataset": {k: getattr(pull, k) for k in live["dataset"]},
           "sync.models": {k: getattr(pull, k) for k in live["models"]}}
    want = {"sync": {k: v for k, v in live.items() if not isinstance(v, dict)}, "sync.target": live["target"],
            "sync.review": {k: v for k, v in live["review"].items() if not isinstance(v, dict)},
            "sync.dataset": live["dataset"], "sync.models": live["models"]}
    assert got == want
    assert SyncConfig(store_root=Path(), appliance_id="a").batch_size == live["batch_size"]
    assert TargetConfig().kind == live["target"]["kind"]
    # the commented [sync.training] values that are the job's defaults
    commented = {m.group(1): tomllib.loads(f"v = {m.group(2)}")["v"] for m in re.finditer(
        r"^# (min_new_reviewed|poll_interval|max_runtime_s|volume_gb|instance_type) = (\S+)",
        doc_text("deploy/annotator.example.toml").split("# [sync.training]\n", 1)[1], re.M)}
    assert len(commented) == 5
    defaults = {k: getattr(TrainingSettings("r", "i", "s3://b/i", "s3://b/o"), k) for k in commented}
    assert commented == defaults


REFUSED_ALONE = {
    # keys the loaders refuse when uncommented alone, by design (the example shows the partner beside them)
    "server.tls_cert": "needs tls_key (set both or neither)",
    "server.tls_key": "needs tls_cert",
    "server.tls_client_ca": "needs tls_cert and tls_key",
    "sync.target.kms_key_id": "needs sse = \"aws:kms\"",
    "sync.models.registry.kms_key_id": "needs sse = \"aws:kms\"",
    "engine.bundle_public_key": "read at start: the example's /etc/annotator/registry.pub is not on this box",
    "sync.models.public_key": "read at start: the example's /etc/annotator/registry.pub is not on this box",
    "sync.training.sign_key": "read at start: the example's registry.key is not on this box",
}


def load_both(f: Path) -> None:
    """What `annotator serve` and `annotator sync` (and `annotator doctor`) read before they start."""
    from service.config import load_config
    from sync.agent import validated_settings
    from sync.config import load_sync_config

    load_config(f, env={})
    validated_settings(load_sync_config(f, env={}), env={})


def test_every_key_of_the_example_uncommented_alone_parses(tmp_path: Path) -> None:
    """Each commented key or table of the example, uncommented alone (with its commented table
    header), is read by service.config.load_config and sync.config.load_sync_config plus the
    agent's own validation (as `annotator sync` and `annotator doctor` do): no key is unknown,
    and a refusal names another key the table requires (a partner still commented out), never
    the key itself, but for the few REFUSED_ALONE. The commented tables uncommented whole
    (but for a key file that is not on this box) are taken as they are."""
    from service.errors import ConfigError
    from sync.errors import SyncError

    wrong, count = [], 0
    f = tmp_path / "annotator.toml"
    for table, key, line, text in example_variants():
        count += 1
        f.write_text(text)
        dotted = f"{table}.{key}" if key else table
        try:
            load_both(f)
        except (ConfigError, SyncError) as exc:
            msg = str(exc)
            if re.search(r"unknown|did you mean|cannot be read", msg) or (
                    key and msg.startswith(dotted + ":") and dotted not in REFUSED_ALONE):
                wrong.append(f"{line!r} in [{table}]: {msg}")
    assert count > 70, count
    # the commented-out tables, whole
    lines = example_lines()
    for table in ("sync.models.registry", "sync.training", "sync.review.groundtruth.job"):
        # the training job publishes to the registry; a labeling job's output_s3_path names the appliance
        whole = {table, "sync.training.hyperparameters", "sync.models.registry"} if table == "sync.training" else {table}
        new, inside = [], False
        for line in lines:
            if m := re.match(r"#?\s*\[([a-z_.]+)\]", line):
                inside = m.group(1) in whole
            if line.startswith("# appliance_id =") and table == "sync.review.groundtruth.job":
                line = line[2:]
            if inside and line.startswith("#") and not re.match(r"#\s*(sign_key|root = \"/srv/model-registry\")", line) \
                    and re.match(r"#\s*([a-z0-9_]+\s*=|\[)", line):
                line = re.sub(r"^#\s*", "", line)
            new.append(line)
        text = "\n".join(new) + "\n"
        if table == "sync.review.groundtruth.job":  # a labeling job needs the S3 target and Ground Truth
            text = re.sub(r'^kind = "local"$', 'kind = "s3"\nbucket = "edge-review"', text, count=1, flags=re.M)
            text = re.sub(r'^kind = "none"$', 'kind = "groundtruth"', text, count=1, flags=re.M)
        f.write_text(text)
        try:
            load_both(f)
        except (ConfigError, SyncError) as exc:
            wrong.append(f"[{table}] uncommented whole: {exc}")
    assert not wrong, "\n".join(wrong)


# -- 3. metrics -----------------------------------------------------------------------------
def exposed_metrics() -> dict[str, str]:
    """Every series name the endpoints can expose -> "daemon" | "sync" | "both"."""
    from service.metrics import STORE_COUNTERS

    src = (ROOT / "service/metrics.py").read_text()
    out: dict[str, str] = {}
    for m in re.finditer(r"(Counter|Gauge|Histogram|Info|CounterMetricFamily|GaugeMetricFamily)\(f\"\{PREFIX\}_(\w+)\""
                         r"(.{0,400}?registry=(r[ds]?)\b)?", src, re.S):
        kind, base, reg = m.group(1), "annotator_" + m.group(2), m.group(4)
        where = {"rd": "daemon", "rs": "sync"}.get(reg or "", "both")
        suffixes = {"Counter": ["_total"], "CounterMetricFamily": ["_total", ""], "Info": ["_info"],
                    "Histogram": ["_bucket", "_sum", "_count", ""]}.get(kind, [""])
        for s in suffixes:
            out[base + s] = where
    for name in STORE_COUNTERS:
        out[f"annotator_{name}_total"] = "daemon"
    return out


def test_every_metric_the_docs_name_is_exposed() -> None:
    exposed = exposed_metrics()
    assert len(exposed) > 30
    wrong, checked = [], 0
    for name in DOCS:
        for m in re.finditer(r"\bannotator_[a-z_]+", doc_text(name)):
            metric = m.group(0)
            checked += 1
            if metric not in exposed:
                wrong.append(f"{name}: {metric} is on no endpoint")
    # what the README says is the sync agent's endpoint's
    for metric in ("annotator_reviews_refused", "annotator_sync_last_success_timestamp_seconds"):
        assert exposed.get(metric) == "sync", (metric, exposed.get(metric))
    assert checked >= 5
    assert not wrong, "\n".join(wrong)


# -- 4. paths -------------------------------------------------------------------------------
REPO_TOP = ("service/", "sync/", "exporter/", "tests/", "docs/", "deploy/", "protos/", ".ci/")


def path_mentions(name: str) -> Iterator[tuple[str, str]]:
    text = doc_text(name)
    for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # markdown links
        yield m.group(1), f"{name}: link {m.group(0)}"
    for span, _ in code_spans(name):
        for m in re.finditer(r"(?<![\w./-])((?:\.\./)?[\w.-]+/[\w./{},*-]*[\w*}])", span):
            yield m.group(1), f"{name}: `{span.strip()}`"


def test_every_repository_path_the_docs_name_exists() -> None:
    wrong, checked = [], 0
    local = {"systemd/", "dev/", "install.sh", "uninstall.sh", "annotator.toml"}  # deploy/README.md's own folder
    for name in DOCS:
        base = (ROOT / name).parent
        for path, where in path_mentions(name):
            if path.startswith(NOT_A_REPO_PATH) or "://" in path:
                continue
            in_repo = path.startswith(REPO_TOP) or name == "deploy/README.md" and path.startswith(tuple(local))
            if not in_repo:
                continue
            checked += 1
            names = [path]
            if "{" in path:  # results.{md,json}
                head, alts, tail = re.match(r"(.*)\{([^}]*)\}(.*)", path).groups()
                names = [head + a + tail for a in alts.split(",")]
            for p in names:
                hits = glob.glob(str(ROOT / p)) + glob.glob(str(base / p))
                if not hits:
                    wrong.append(f"{where}: {p} does not exist")
    assert checked > 40, checked
    assert not wrong, "\n".join(wrong)


def test_every_python_name_the_docs_name_exists() -> None:
    """`python -m service.store_scale`, `service.confcal.single_threaded_blas`, ... resolve."""
    wrong, checked = [], 0
    for name in DOCS:
        for span, _ in code_spans(name):
            for m in re.finditer(r"(?<![\w./-])((?:service|sync|exporter|protos)\.[a-z_][\w.]*\w)", span):
                dotted = m.group(1)
                if dotted in NOT_LITERAL or dotted.endswith((".py", ".lock")):
                    continue
                checked += 1
                parts = dotted.split(".")
                for i in range(len(parts), 0, -1):
                    module = ".".join(parts[:i])
                    if (ROOT / (module.replace(".", "/") + ".py")).exists() or (ROOT / module.replace(".", "/")).is_dir():
                        break
                else:
                    wrong.append(f"{name}: `{span}`: no module {dotted}")
                    continue
                if i < len(parts) and module in ("service.keypoints", "service.confcal", "service.client"):
                    obj: Any = importlib.import_module(module)
                    for attr in parts[i:]:
                        if not hasattr(obj, attr):
                            wrong.append(f"{name}: `{span}`: {module} has no {'.'.join(parts[i:])}")
                            break
                        obj = getattr(obj, attr)
    assert checked >= 5, checked
    assert not wrong, "\n".join(wrong)


def test_the_other_variables_the_docs_name_are_read() -> None:
    """ANNOTATOR_CONFIG, ANNOTATOR_TOKEN, ANNOTATOR_LABEL_STUDIO_TOKEN: not config keys, but read
    by the code under those names."""
    code = "\n".join(p.read_text() for d in ("service", "sync") for p in (ROOT / d).glob("*.py"))
    named = {m for n in DOCS for m in re.findall(r"\bANNOTATOR_[A-Z_]+[A-Z]\b", doc_text(n)) if "__" not in m}
    named -= {"ANNOTATOR_SECTION_KEY"}  # the README's example of a refused name
    assert {"ANNOTATOR_CONFIG", "ANNOTATOR_TOKEN", "ANNOTATOR_LABEL_STUDIO_TOKEN"} <= named
    assert not [n for n in named if f'"{n}"' not in code and f"'{n}'" not in code], named


def test_the_installed_config_loads() -> None:
    """deploy/annotator.toml (what install.sh puts in /etc/annotator) is read by both loaders and
    has the metrics endpoint and bundle path deploy/README.md states."""
    from service.config import load_config

    cfg = load_config(ROOT / "deploy/annotator.toml", env={})
    assert cfg.metrics.listen == "127.0.0.1:9464"
    assert str(cfg.engine.bundle) == "/var/lib/annotator/store/models/current"
