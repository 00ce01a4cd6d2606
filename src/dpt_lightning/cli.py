"""The ``dpt`` command: LightningCLI with the data's facts linked into the model."""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from dpt_lightning.backbone import BackboneLoadError
from dpt_lightning.checkpoint_io import AtomicCheckpointIO
from dpt_lightning.callbacks import DivergenceGuard, PredictionWriter, SelectionWriter, UntrainedNotice
from dpt_lightning.data import MedicalDataModule
from dpt_lightning.methods.base import PromptTrainer
from dpt_lightning.methods.checkpoints import CheckpointMismatchError, read_checkpoint
from dpt_lightning.runs import last_checkpoint


class DPTCLI(LightningCLI):
    """``dpt fit|validate|test|predict``. Class names, dataset and protocol come from the data;
    ``seed_everything`` defaults to ``data.seed`` (one seed per run, as the reference code)."""

    #: The class names the user gave the model (``--model.init_args.classnames``), if any.
    user_classnames: list | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classnames", "model.init_args.classnames", compute_fn=self.data_classnames,
                              apply_on="instantiate")
        parser.link_arguments("data.dataset_name", "model.init_args.dataset", apply_on="instantiate")
        parser.link_arguments("data.protocol", "model.init_args.protocol", apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(SelectionWriter, "selection")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the last epoch's model (as the reference code does)")
        parser.add_argument("--untrained", type=bool, default=False,
                            help="validate, test or predict with a learning method's initial parameters on purpose "
                                 "(no --ckpt_path): no warning (UNTRAINED.txt in the run folder still says so)")
        parser.add_argument("--allow_unverified_backbone", type=bool, default=False,
                            help="load a checkpoint of an older format, which records no digest of its backbone's "
                                 "weights (only the widths can then be compared)")

    def data_classnames(self, classnames: list[str]) -> list[str]:
        """The data's class names, which the model gets; class names the user gave the model must
        be the same (never silently replaced)."""
        given = self.user_classnames
        if given is not None and list(given) != list(classnames):
            raise ValueError(f"model.init_args.classnames {list(given)} differ from the data's classes "
                             f"{list(classnames)}: the model always gets the data's classes (their order is the "
                             "labels'); remove model.init_args.classnames, or change the data (for a CSV: "
                             "data.class_order)")
        return classnames

    def instantiate_classes(self) -> None:
        """Build the classes; a library's exception while building them is one message (`BuildError`)."""
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - a user error passes as it is; anything else: one message
            if user_error(err) is not None:
                raise
            raise BuildError(build_error_message(err)) from err
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.allow_unverified_backbone = bool(config.get("allow_unverified_backbone"))

    def instantiate_trainer(self, **kwargs):
        plugins = kwargs.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(UntrainedNotice(allow=bool(config.get("untrained"))))
        return trainer

    def after_fit(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if config.get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)

    def parse_arguments(self, parser, args) -> None:
        """Parse; ``seed_everything: true`` (the default) means the data's seed; ``--ckpt_path last``
        means this run's own last checkpoint (`runs.last_checkpoint`); a checkpoint that cannot be
        read is an error naming it before anything is built. The config and the command line
        define the model: a checkpoint never changes them (its identity must match instead)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        check_run_config(subcommand, config)
        seed_setting = "seed_everything"
        if config.get("seed_everything") is True:
            seed = config.get("data.init_args.seed") if config.get("data") is not None else None
            if isinstance(seed, int):
                config["seed_everything"], seed_setting = seed, "data.seed"
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"{seed_setting} {seed} is not a seed: give a number from 0 to {MAX_SEED}")
        self.user_classnames = config.get("model.init_args.classnames") if config.get("model") is not None else None
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            root = config.get("trainer.default_root_dir") or "."
            ckpt_path = str(last_checkpoint(root, config.as_dict()))
        if ckpt_path:
            read_checkpoint(ckpt_path)
            # Hidden until the classes are built: LightningCLI would otherwise apply the checkpoint's
            # stored settings over this config (and import the class they name).
            config["ckpt_path"] = None
        self.checkpoint_path = ckpt_path

    def before_instantiate_classes(self) -> None:
        if self.checkpoint_path:
            self.config[self.subcommand]["ckpt_path"] = self.checkpoint_path


#: The largest seed (numpy's generators take 0 .. 2**32 - 1).
MAX_SEED = 2**32 - 1


class BuildError(RuntimeError):
    """A library's exception while the run's classes were built from the config."""


def build_error_message(err: BaseException) -> str:
    """One line for an exception raised while building the classes: the innermost exception of
    the chain (jsonargparse wraps the real one) and where it was raised."""
    seen = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    tb, where = err.__traceback__, ""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" (raised in {Path(tb.tb_frame.f_code.co_filename).name}, line {tb.tb_lineno}, " \
                f"{tb.tb_frame.f_code.co_name})"
    text = (str(err).strip().splitlines() or [""])[0][:300]
    return (f"could not build the run from its config: {type(err).__name__}: {text}{where}; check the settings "
            "of the model, data and trainer (--print_config shows them)")


def _names_abstract(config, section: str, base: type, hook: str) -> bool:
    """Does the config section (``model``, ``data``) name no class, or ``base`` itself (a class
    that does not implement ``hook``: what LightningCLI falls back to when no config gave one)?"""
    class_path = config.get(f"{section}.class_path") if config.get(section) is not None else None
    module, _, name = str(class_path or "").rpartition(".")
    if not module:
        return True
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:  # jsonargparse resolved it already; nothing to add here
        return False
    return getattr(cls, hook, None) is getattr(base, hook)


def shipped_configs(folder: str) -> str:
    return ", ".join(sorted(f.stem for f in (CHECKOUT / folder).glob("*.yaml"))) or "none found"


def check_run_config(subcommand: str | None, config) -> None:
    """Mistakes of the first hour, each one message before anything is built: no method config
    (the abstract `PromptTrainer`), no data config (the abstract `MedicalDataModule`), a run folder
    that cannot be written, ``validate`` with validation switched off."""
    if subcommand is None:
        return
    if _names_abstract(config, "model", PromptTrainer, "encode_classes"):
        raise ValueError(f"no method config: add --config trainers/<method>.yaml (shipped: "
                         f"{shipped_configs('trainers')}), or --model <class> of a method")
    if _names_abstract(config, "data", MedicalDataModule, "all_classnames"):
        raise ValueError(f"no data config: add --config datasets/<dataset>.yaml (shipped: "
                         f"{shipped_configs('datasets')}), or your own data with --data ImageFolderDataModule "
                         "--data.root FOLDER (or --data CSVDataModule --data.csv FILE; README 'Your own data')")
    require_writable_folder(Path(config.get("trainer.default_root_dir") or "."))
    if subcommand == "validate" and config.get("trainer.limit_val_batches") == 0:
        raise ValueError("dpt validate: validation is off in this config (trainer.limit_val_batches: 0, as the "
                         "reference code, which selects no model on validation); add --trainer.limit_val_batches "
                         "1.0 to validate")


def require_writable_folder(folder: Path) -> None:
    """The run folder (``trainer.default_root_dir``) must be a folder this user can write: logs,
    the config and checkpoints go there. One message naming it, before anything is built."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".dpt-write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"trainer.default_root_dir {folder} cannot be written ({err.strerror or err}): the run's "
                         "logs, config and checkpoints go there; choose a folder you can write with "
                         "--trainer.default_root_dir PATH") from None


def build_cli(args: list[str] | None = None, run: bool = True, parser_kwargs: dict | None = None) -> DPTCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; the same code path as
    ``dpt``, for programmatic use (tests, the benchmark runner). ``parser_kwargs`` go to the
    argument parser (e.g. ``{"exit_on_error": False}``: argument errors raise instead of exiting)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_warnings()
    importable_working_directory()
    args = with_shipped_configs(sys.argv[1:] if args is None else list(args))
    return DPTCLI(
        PromptTrainer,
        MedicalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=True,
        save_config_kwargs={"overwrite": False},
        trainer_defaults={"callbacks": [ModelCheckpoint(save_last=True)]},
        args=args,
        run=run,
        parser_kwargs=parser_kwargs,
        auto_configure_optimizers=False,
    )


#: The checkout holding the shipped ``trainers/`` and ``datasets/`` configs (source layout).
CHECKOUT = Path(__file__).resolve().parents[2]


def with_shipped_configs(args: list[str]) -> list[str]:
    """``--config trainers/<x>.yaml`` and ``datasets/<x>.yaml`` work from any folder: a config path
    that does not exist here but names a shipped config is read from the dpt_lightning checkout."""
    out = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if i > 0 and args[i - 1] == "--config":
            arg = str(_shipped(arg))
        elif flag == "--config" and eq:
            arg = f"--config={_shipped(value)}"
        out.append(arg)
    return out


def _shipped(path: str) -> Path | str:
    given = Path(path)
    shipped = CHECKOUT / given
    if not given.exists() and not given.is_absolute() and given.parts[:1] in (("trainers",), ("datasets",)) \
            and shipped.is_file():
        return shipped
    return path


def importable_working_directory() -> None:
    """Let configs name classes in modules of the current folder (``--model my_method.MyCoOp``), as
    ``python -m`` would: the working directory goes at the front of the import path."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def quiet_known_warnings() -> None:
    """Silence Lightning notices that are expected here (a frozen backbone is in eval mode)."""
    for pattern in (".*module\\(s\\) in eval mode.*", ".*LeafSpec.*", ".*does not have many workers.*",
                    ".*tensorboardX.*", ".*litlogger.*", ".*litmodels.*", ".*LightningCLI's args parameter.*"):
        warnings.filterwarnings("ignore", message=pattern)


#: Errors a user's input can cause (settings, data, banks, checkpoints, files), when our own code
#: raised them: the command prints their message alone. Anything else keeps its traceback.
USER_ERRORS = (ValueError, OSError, CheckpointMismatchError, BackboneLoadError, FloatingPointError, BuildError)
PACKAGE_DIR = Path(__file__).resolve().parent


def user_error(err: BaseException) -> BaseException | None:
    """The exception, in ``err``'s chain, that our code raised for bad input; None if there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        raised_here = tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
        if raised_here and isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``dpt`` command. A user error (bad setting, data, bank or checkpoint)
    prints one message and exits with status 2; ``--debug`` or ``DPT_DEBUG=1`` shows the traceback."""
    args = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in args or os.environ.get("DPT_DEBUG", "").lower() in {"1", "true", "yes"}
    args = [a for a in args if a != "--debug"]
    try:
        build_cli(args)
    except Exception as err:  # noqa: BLE001 - shown as one line only when it is a user error
        cause = None if debug else user_error(err)
        if cause is None:
            raise
        message = str(cause) if not isinstance(cause, OSError) or not cause.filename else \
            f"{cause.filename}: {cause.strerror or cause}"
        print(f"dpt: error: {message}\n(run with --debug, or DPT_DEBUG=1, for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
