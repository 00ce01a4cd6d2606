"""The ``dpt-prompts`` command: description banks (``{classname: [sentences]}`` JSON files).

    dpt-prompts list                              the shipped banks
    dpt-prompts show BTMRI [-n 3]                 classes, counts and a few sentences of a bank
    dpt-prompts check my_bank.json --dataset BTMRI (or --classes "a b" "c d")
                                                  does a bank cover every class? (exit 1 if not)
    dpt-prompts import prompt_templates.py -o bank.json [--name BIOMEDDPT_TEMPLATES] [--dataset BTMRI] [--force]
                                                  convert a reference Python file (read as data,
                                                  never executed) or a JSON file into a bank

The reference repositories keep their sentences in ``trainers/prompt_templates.py``; importing it
lets you reproduce the published runs with the original sentences:
``--model.descriptions bank.json``.
"""
from __future__ import annotations

import argparse
import sys

from dpt_lightning.descriptions import (
    SHIPPED_ALIASES,
    DescriptionBankError,
    builtin_bank_names,
    import_bank,
    load_bank,
    sentences_for,
    write_bank,
)


def _dataset_classes(dataset: str) -> list[str]:
    from dpt_lightning.data.facts import dataset_facts  # the data package imports torch: only for --dataset

    try:
        return list(dataset_facts(dataset).classnames)
    except KeyError as err:
        raise DescriptionBankError(str(err.args[0])) from None


def _classes(args: argparse.Namespace) -> list[str] | None:
    if args.dataset and args.classes:
        raise DescriptionBankError("give --dataset or --classes, not both")
    if args.dataset:
        return _dataset_classes(args.dataset)
    return list(args.classes) if args.classes else None


def cmd_list(args: argparse.Namespace) -> int:
    for name in builtin_bank_names():
        if name in SHIPPED_ALIASES:
            print(f"{name}: the {SHIPPED_ALIASES[name]} bank")
            continue
        bank = load_bank(name)
        print(f"{name}: {len(bank)} classes, {sum(map(len, bank.values()))} sentences")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    bank = load_bank(args.bank)
    for name, sentences in bank.items():
        print(f"{name} ({len(sentences)} sentences)")
        for sentence in sentences[:args.n]:
            print(f"  - {sentence}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    bank = load_bank(args.bank)
    classes = _classes(args)
    if classes is None:
        raise DescriptionBankError("check needs --dataset NAME or --classes NAME [NAME ...]")
    groups = sentences_for(bank, classes, args.bank)
    for name, sentences in zip(classes, groups):
        repeated = len(sentences) - len(set(sentences))
        note = f", {repeated} repeated" if repeated else ""
        print(f"{name}: {len(sentences)} sentences{note}")
    print(f"ok: {args.bank} covers all {len(classes)} classes")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    bank = import_bank(args.file, name=args.name)
    classes = _classes(args)
    if classes is not None:
        bank = dict(zip(classes, sentences_for(bank, classes, args.file)))
    path = write_bank(bank, args.output, force=args.force)
    print(f"wrote {path}: {len(bank)} classes, {sum(map(len, bank.values()))} sentences")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpt-prompts", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("list", help="list the shipped banks")
    p.set_defaults(run=cmd_list)

    p = commands.add_parser("show", help="print a bank's classes and first sentences")
    p.add_argument("bank", help="a shipped bank (dataset name, e.g. BTMRI) or a JSON file")
    p.add_argument("-n", type=int, default=3, help="sentences shown per class (default 3)")
    p.set_defaults(run=cmd_show)

    def class_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", help="the classes of this benchmark dataset (e.g. BTMRI)")
        p.add_argument("--classes", nargs="+", help="class names (quote names with spaces)")

    p = commands.add_parser("check", help="check that a bank has sentences for every class")
    p.add_argument("bank", help="a JSON file or a shipped bank name")
    class_options(p)
    p.set_defaults(run=cmd_check)

    p = commands.add_parser("import", help="convert a reference prompt_templates.py (read as data) or JSON to a bank")
    p.add_argument("file", help="a .py file of NAME = {classname: [sentences]} dicts, or a .json bank")
    p.add_argument("-o", "--output", required=True, help="the bank JSON to write")
    p.add_argument("--name", help="which dict of the Python file (e.g. BIOMEDDPT_TEMPLATES, BIOMEDCOOP_TEMPLATES)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    class_options(p)
    p.set_defaults(run=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpt-prompts``; errors are printed as one line and exit with status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DescriptionBankError, FileExistsError) as err:
        print(f"dpt-prompts {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # any other file problem: one line naming the file, no traceback
        where = f" {err.filename}" if err.filename else ""
        print(f"dpt-prompts {args.command}: error:{where} {err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
