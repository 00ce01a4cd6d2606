"""Benchmark grids: the grid YAML file, its checks, and its expansion into cells (runs).

A grid names methods (method configs), datasets (dataset configs and their data root), shots,
seeds, the protocol(s) and overrides; `load_grid` reads and checks it (every problem names the
file, the line and the key), `expand` turns it into `Run` objects (the cells of the grid), and each
`Run` knows the ``dpt`` arguments that execute it and the fingerprint that says whether a stored
result is still valid. `GridSpec` declares the keys and their types (`schema` checks a file against
it: ``fit: 'false'`` is text, not a boolean; an axis such as ``seeds`` is a non-empty list without
repeats); every config file the grid names is read, and checked to be a YAML mapping, at load.

Grid keys (paths are relative to the grid file)::

    name: fewshot                     # default: the grid file's name
    protocol: fewshot                 # fewshot | base2novel, or a list of both
    methods:                          # a method config, or {config, name, fit, args, selection_seed}
      - ../trainers/coop.yaml
      - {config: ../trainers/zeroshot.yaml, name: zeroshot}
      - {config: ../trainers/linear_probe.yaml, selection_seed: 1}   # every seed trains on seed 1's images
    datasets:                         # a dataset config, or {config, name, root, args}
      - ../datasets/btmri.yaml
    data_root: ${DPT_DATA_ROOT}       # --data.root of every dataset without its own root ($VARS expand)
    shots: [1, 2, 4, 8, 16]           # base2novel: default [16]
    seeds: [1, 2, 3]                  # left out: [1]
    backbones:                        # optional axis: --model.init_args.backbone=<id> per cell
      - hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
      - {backbone: openclip:ViT-B-16/openai, name: clip}   # name: the label in cell names and tables
    trainer: {max_epochs: 50}         # --trainer.<key> for every run; also model:, data:
    args: []                          # raw extra dpt arguments for every run
    output: runs                      # where timestamped run folders go (relative to the cwd)
    published: auto                   # show the papers' averages: auto (benchmark datasets) | true | false

A method whose class declares ``learns = False`` (ZeroShot) is tested once per dataset and
protocol: shots and seeds do not change its result. ``fit:`` in the grid overrides the class.

A method's ``selection_seed`` fixes its few-shot images (``--data.selection_seed``) while the grid's
seeds still vary the training (``--data.seed``): the BiomedCoOp code's protocol for its adapter
baselines. Its cells are named ``..._K16_sel1_seed2`` and labelled ``seed 2 (images of seed 1)``.

With ``backbones:`` every cell runs once per backbone (`Run.backbone`). The cell names carry the
backbone's label only when the axis has more than one value, so a grid with one backbone (or none:
each config's own) keeps its cell folders; the summary then shows methods × backbones.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from dpt_lightning.bench.schema import AXIS, line_of, parse
from dpt_lightning.files import YAMLFileError, read_yaml
from dpt_lightning.recipe import PROTOCOLS

#: Packages whose classes are not part of a method's own source (a method's fingerprint covers the
#: files of its class and of its base classes from dpt_lightning or the user's own modules).
FRAMEWORK_PACKAGES = {"builtins", "abc", "typing", "torch", "lightning", "pytorch_lightning", "lightning_fabric",
                      "torchmetrics"}


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file and the setting."""


# ---------------------------------------------------------------------- the grid file's schema
IntAxis = Annotated[list[int] | int, AXIS]  # a non-empty list without repeats, or one value


@dataclass
class MethodSpec:
    """A ``methods:`` entry written as a mapping."""

    config: str
    name: str | None = None
    fit: bool | None = None  # None: the class's ``learns``
    args: list[str] | None = None
    selection_seed: int | None = None  # the few-shot images' seed, whatever the run's seed


@dataclass
class DatasetSpec:
    """A ``datasets:`` entry written as a mapping."""

    config: str
    name: str | None = None
    root: str | None = None
    args: list[str] | None = None


@dataclass
class BackboneSpec:
    """A ``backbones:`` entry written as a mapping."""

    backbone: str
    name: str | None = None


@dataclass
class GridSpec:
    """The keys of a grid file and their types (module docstring), checked by `schema.parse`."""

    methods: Annotated[list[str | MethodSpec], AXIS]
    datasets: Annotated[list[str | DatasetSpec], AXIS]
    name: str | None = None
    protocol: Annotated[list[str] | str, AXIS] = field(default_factory=lambda: ["fewshot"])  # of PROTOCOLS
    data_root: str | None = None
    shots: IntAxis | dict[str, IntAxis] | None = None  # None: [16] for base2novel; fewshot needs it
    seeds: IntAxis = field(default_factory=lambda: [1])
    backbones: Annotated[list[str | BackboneSpec] | str, AXIS] = field(default_factory=list)
    trainer: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    args: list[str] | None = None
    output: str = "runs"
    published: Literal["auto", "true", "false", True, False] = "auto"


# ------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Entry:
    """A method or a dataset of the grid: its config file and its own extra arguments."""

    name: str
    config: str
    args: tuple[str, ...] = ()
    root: str | None = None  # datasets only
    fit: bool = True  # methods only: False = test only (nothing to learn)
    selection_seed: int | None = None  # methods only: the few-shot images' seed, whatever the run's seed


@dataclass(frozen=True)
class Backbone:
    """A value of the grid's ``backbones:`` axis: the backbone id and its short label."""

    id: str
    name: str


def backbone_label(backbone: str) -> str:
    """A short, file-name-safe label of a backbone id: ``openclip:ViT-B-16/openai`` -> ``ViT-B-16-openai``,
    ``hf-hub:org/Model`` -> ``Model``, ``local-dir:/a/folder`` -> ``folder``, ``tiny-clip`` -> itself."""
    if backbone.startswith("openclip:"):
        return safe_name(backbone[len("openclip:"):].replace("/", "-"))
    for scheme in ("hf-hub:", "hf-clip:", "local-dir:"):
        if backbone.startswith(scheme):
            backbone = backbone[len(scheme):]
    return safe_name(Path(backbone.rstrip("/")).name or backbone)


@dataclass
class Grid:
    name: str
    protocols: list[str]
    methods: list[Entry]
    datasets: list[Entry]
    shots: dict[str, list[int]]  # per protocol
    seeds: list[int]
    args: list[str]  # overrides for every run
    output: str = "runs"
    backbones: list[Backbone] = field(default_factory=list)  # empty: each config's own backbone
    published: str = "auto"
    source: str = ""

    def to_yaml(self) -> str:
        """The grid with every path resolved: loading it again gives the same runs."""
        data = {
            "name": self.name, "protocol": self.protocols,
            "methods": [{"config": m.config, "name": m.name, "fit": m.fit, "args": list(m.args),
                         **({} if m.selection_seed is None else {"selection_seed": m.selection_seed})}
                        for m in self.methods],
            "datasets": [{"config": d.config, "name": d.name, "root": d.root, "args": list(d.args)}
                         for d in self.datasets],
            "shots": self.shots if len(self.protocols) > 1 else self.shots[self.protocols[0]],
            "seeds": self.seeds, "args": self.args, "output": self.output, "published": self.published,
        }
        if self.backbones:
            data["backbones"] = [{"backbone": b.id, "name": b.name} for b in self.backbones]
        return f"# dpt-bench grid as run (from {self.source})\n" + yaml.safe_dump(data, sort_keys=False)


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` on every system (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.") or "x"


def _flag(prefix: str, key: str, value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{prefix}{key}={text}"


def override_args(spec: GridSpec) -> list[str]:
    """``trainer:``, ``model:``, ``data:`` mappings and ``args:`` as dpt command-line arguments."""
    out = []
    sections = ((spec.trainer, "trainer."), (spec.model, "model.init_args."), (spec.data, "data.init_args."))
    for values, prefix in sections:
        out += [_flag(prefix, key, value) for key, value in (values or {}).items()]
    return out + list(spec.args or [])


# ------------------------------------------------------------------- the method class
def model_class_path(config: str | Path, args=()) -> str | None:
    """The ``model`` class path a run uses: the config's ``model.class_path``, or the last
    ``--model X`` / ``--model=X`` / ``--model.class_path X`` among ``args``."""
    model = read_yaml(config, "config file").get("model") or {}
    found = model.get("class_path") if isinstance(model, dict) else (model if isinstance(model, str) else None)
    args = list(args)
    for i, arg in enumerate(args):
        for flag in ("--model", "--model.class_path"):
            if arg == flag and i + 1 < len(args):
                found = args[i + 1]
            elif arg.startswith(flag + "="):
                found = arg.split("=", 1)[1]
    return found


def import_class(class_path: str | None) -> type | None:
    """The class named by a config's class path (a bare name is looked up in ``dpt_lightning``);
    None when it cannot be imported (the run itself then reports the bad class path)."""
    if not class_path or not isinstance(class_path, str):
        return None
    module, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "dpt_lightning"), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def method_learns(config: str | Path, args=()) -> bool:
    """The method class's ``learns`` declaration (True when the class cannot be imported: the
    run will report it). ``fit:`` in the grid overrides it."""
    cls = import_class(model_class_path(config, args))
    return bool(getattr(cls, "learns", True)) if cls is not None else True


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def method_source(class_path: str | None) -> dict[str, str]:
    """``{module: sha256 of its file}`` for the method class and its base classes outside the
    frameworks (dpt_lightning's and the user's own): editing any of those files changes the
    fingerprint of the method's runs, so their results are recomputed."""
    cls = import_class(class_path)
    if cls is None:
        return {"unresolved": str(class_path)}
    digests = {}
    for klass in inspect.getmro(cls):
        module = klass.__module__ or ""
        if module.split(".")[0] in FRAMEWORK_PACKAGES:
            continue
        try:
            path = inspect.getsourcefile(klass)
        except TypeError:  # a built-in class
            continue
        if path and os.path.isfile(path):
            stat = os.stat(path)
            digests[module] = _file_digest(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    return dict(sorted(digests.items()))


# ----------------------------------------------------------------------- reading a grid
def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file: its values by type (`GridSpec`), then what types cannot say
    (files exist, names differ...); every problem is a `GridError` naming the file, the line
    and the key."""
    path = Path(path).expanduser().resolve()
    where = f"grid {path}"
    try:
        raw = read_yaml(path, "grid file")
    except FileNotFoundError:
        raise GridError(f"{where}: file not found") from None
    except YAMLFileError as err:
        raise GridError(f"grid {err}") from None
    spec, problems = parse(raw, GridSpec)
    if problems:
        text = path.read_text(encoding="utf-8", errors="replace")
        raise GridError(f"{where}: " + "; ".join(f"line {line_of(text, p.place)}: {p}" for p in problems))
    protocols = spec.protocol
    if any(p not in PROTOCOLS for p in protocols):
        raise GridError(f"{where}: protocol must be fewshot, base2novel or a list of them, got {protocols}")
    shots = spec.shots if isinstance(spec.shots, dict) else {p: spec.shots for p in protocols}  # per protocol:
    if set(shots) - set(protocols):  # as in the copy of the grid in a run folder
        raise GridError(f"{where}: shots: {sorted(set(shots) - set(protocols))} are not protocols of this grid")
    shots = {p: shots.get(p) or ([16] if p == "base2novel" else None) for p in protocols}
    if None in shots.values():
        raise GridError(f"{where}: 'shots' is missing: give the shot counts of the few-shot runs, e.g. "
                        "shots: [1, 4, 16]")
    bad_shots = sorted({k for values in shots.values() for k in values if k < 1})
    if bad_shots:
        raise GridError(f"{where}: shots must be at least 1, got {bad_shots}")
    base = path.parent
    common = override_args(spec)
    data_root = None if spec.data_root is None else _expand_root(spec.data_root, base, f"{where}: data_root")
    return Grid(
        name=safe_name(spec.name or path.stem),
        protocols=protocols,
        methods=_entries(spec.methods, "methods", base, where, common=common),
        datasets=_entries(spec.datasets, "datasets", base, where, data_root),
        shots=shots,
        seeds=list(spec.seeds),
        args=common,
        output=spec.output,
        published=str(spec.published).lower(),
        source=str(path),
        backbones=_backbones(spec, where),
    )


def _entries(items: list, kind: str, base: Path, where: str, data_root: str | None = None,
             common=()) -> list[Entry]:
    entries, problems = [], []
    for item in items:
        spec = item if not isinstance(item, str) else (MethodSpec if kind == "methods" else DatasetSpec)(item)
        config = (base / spec.config).expanduser().resolve()
        if not config.is_file():
            problems.append(f"{kind} config {spec.config} not found (looked for {config}); paths are "
                            "relative to the grid file")
            continue
        try:
            read_yaml(config, "config file")  # every file the grid names is read (and checked) now
        except YAMLFileError as err:
            problems.append(f"{kind} config {err}")
            continue
        name = safe_name(spec.name or config.stem)
        args = tuple(spec.args or ())
        if kind == "methods":
            fit = spec.fit if spec.fit is not None else method_learns(config, [*common, *args])
            entries.append(Entry(name, str(config), args, fit=fit, selection_seed=spec.selection_seed))
        else:
            root = spec.root if spec.root is not None else data_root
            if root is not None:
                root = _expand_root(root, base, f"{where}: datasets entry {spec.config}: root")
            entries.append(Entry(name, str(config), args, root=root))
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"{kind} names {duplicates} appear twice; give each entry its own 'name'")
    if problems:
        raise GridError(f"{where}: " + "; ".join(problems))
    return entries


def _expand_root(value, base: Path, where: str) -> str:
    """A data root with ``$VARIABLES`` and ``~`` expanded, relative to the grid file's folder."""
    expanded = os.path.expandvars(str(value))
    if "$" in expanded:
        raise GridError(f"{where} {value!r} names an environment variable that is not set: set it (e.g. "
                        "export DPT_DATA_ROOT=/path/to/data) or write the folder in the grid")
    return str((base / expanded).expanduser().resolve())


def _backbones(spec: GridSpec, where: str) -> list[Backbone]:
    """The ``backbones:`` axis: ids, or ``{backbone: ID, name: LABEL}``; labels must differ."""
    if not spec.backbones:
        return []
    if "backbone" in (spec.model or {}):
        raise GridError(f"{where}: 'model: backbone' and 'backbones' both set the backbone: keep one")
    items = [BackboneSpec(item) if isinstance(item, str) else item for item in spec.backbones]
    out = [Backbone(item.backbone, safe_name(item.name or backbone_label(item.backbone))) for item in items]
    names = [b.name for b in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GridError(f"{where}: backbones labelled {duplicates} appear twice; give each entry its own 'name'")
    return out


# --------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Run:
    """One cell of the grid. ``shots`` and ``seed`` are None for a method that learns nothing."""

    method: Entry
    dataset: Entry
    protocol: str
    shots: int | None
    seed: int | None
    common: tuple[str, ...] = field(default=(), compare=False)
    backbone: Backbone | None = None  # from the grid's backbones: axis (None: the configs' own)
    labelled: bool = False  # the axis has more than one value: the label is part of the cell name

    @property
    def method_label(self) -> str:
        """The method's name, with ``@ <backbone label>`` when the grid compares backbones."""
        return f"{self.method.name} @ {self.backbone.name}" if self.labelled else self.method.name

    @property
    def selection_seed(self) -> int | None:
        """The seed of the few-shot images when the method fixes it (else the run's seed selects)."""
        return self.method.selection_seed if self.shots is not None else None

    @property
    def run_id(self) -> str:
        parts = [self.method.name, *([self.backbone.name] if self.labelled else []), self.dataset.name, self.protocol]
        if self.shots is not None:
            parts += [f"K{self.shots}", *([f"sel{self.selection_seed}"] if self.selection_seed is not None else []),
                      f"seed{self.seed}"]
        return safe_name("_".join(parts))

    def label(self) -> str:
        text = f"{self.method_label} | {self.dataset.name} | {self.protocol}"
        if self.shots is None:
            return text + " | test only"
        images = f" (images of seed {self.selection_seed})" if self.selection_seed is not None else ""
        return text + f" | K={self.shots} | seed {self.seed}{images}"

    def base_args(self, run_dir: Path) -> list[str]:
        args = ["--config", self.method.config, "--config", self.dataset.config]
        if self.dataset.root:
            args += ["--data.root", self.dataset.root]
        args += [*self.common, *self.method.args, *self.dataset.args]
        if self.backbone is not None:
            args.append(f"--model.init_args.backbone={self.backbone.id}")
        if self.shots is not None:
            args += ["--data.num_shots", str(self.shots), "--data.seed", str(self.seed)]
        if self.selection_seed is not None:
            args += ["--data.selection_seed", str(self.selection_seed)]
        return args + ["--trainer.default_root_dir", str(run_dir)]

    def stages(self, run_dir: Path) -> list[tuple[str, list[str], str]]:
        """The dpt subcommands of this run: ``(subcommand, args, metric prefix)``. A ``{ckpt}``
        argument stands for the checkpoint the run's fit wrote."""
        first = "fit" if self.method.fit else "test"
        if self.protocol == "fewshot":
            return [(first, [*self.base_args(run_dir), "--data.subsample", "all"], "")]
        novel = [*self.base_args(run_dir / "novel"), "--data.subsample", "new"]
        if self.method.fit:
            novel += ["--ckpt_path", "{ckpt}"]
        return [(first, [*self.base_args(run_dir), "--data.subsample", "base"], ""), ("test", novel, "novel_")]

    def settings(self) -> dict:
        return {"run_id": self.run_id, "method": self.method.name, "method_config": self.method.config,
                "fit": self.method.fit, "dataset": self.dataset.name, "dataset_config": self.dataset.config,
                "root": self.dataset.root or "", "protocol": self.protocol,
                "shots": self.shots if self.shots is not None else "", "seed": self.seed if self.seed is not None else "",
                "overrides": " ".join([*self.common, *self.method.args, *self.dataset.args]),
                **({"selection_seed": self.selection_seed} if self.selection_seed is not None else {}),
                **({"backbone_label": self.backbone.name} if self.backbone is not None else {})}

    def fingerprint(self) -> str:
        """Digest of everything that determines the result: the configs' content (comments
        ignored), the data root, the overrides, the protocol, shots and seed (and the method's
        selection seed), and the source files of the method class and its base classes (`method_source`)."""
        content = [read_yaml(p, "config file") for p in (self.method.config, self.dataset.config)]
        source = method_source(model_class_path(self.method.config, [*self.common, *self.method.args]))
        key = json.dumps([content, asdict(self.method) | {"config": ""}, asdict(self.dataset) | {"config": ""},
                          list(self.common), self.protocol, self.shots, self.seed, source,
                          *([self.backbone.id] if self.backbone is not None else [])],
                         sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def expand(grid: Grid) -> list[Run]:
    """All runs of the grid, in the order they execute: protocol, dataset, method, backbone, shots, seed."""
    runs = []
    labelled = len(grid.backbones) > 1
    for protocol in grid.protocols:
        for dataset in grid.datasets:
            for method in grid.methods:
                for backbone in grid.backbones or [None]:
                    cell = {"common": tuple(grid.args), "backbone": backbone, "labelled": labelled}
                    if not method.fit:
                        runs.append(Run(method, dataset, protocol, None, None, **cell))
                        continue
                    for shots in grid.shots[protocol]:
                        for seed in grid.seeds:
                            runs.append(Run(method, dataset, protocol, shots, seed, **cell))
    return runs


def find_run(grid: Grid, run_id: str) -> Run:
    """The run of ``grid`` called ``run_id`` (a `GridError` naming the grid if there is none)."""
    for run in expand(grid):
        if run.run_id == run_id:
            return run
    raise GridError(f"grid {grid.source}: no run '{run_id}' (the grid changed after the job was submitted?)")
