"""The ``dpt-data`` command: the benchmark datasets, from the hub to a checked folder.

    dpt-data list                                  the datasets: source, counts, licence notes
    dpt-data download BTMRI BUSI ... | all --root DIR [--replace] [--keep-archive] [--dry-run]
                                                   download, verify, unpack into the benchmark layout
    dpt-data prepare NAME --root DIR --archive FILE [FILE ...] [--replace]
                                                   the same from archives you downloaded yourself
    dpt-data check BTMRI ... | all --root DIR [--decode]
                                                   layout, split file, published counts, class
                                                   folders, every image (exit 1 unless all
                                                   match the published benchmark)

``--root`` is the folder that holds ``BTMRI/``, ``BUSI/``, ...: the ``--data.root`` of ``dpt``.
Downloads go through huggingface_hub (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` apply),
are resumed when interrupted and checked against the hub's SHA-256 before anything is unpacked;
a dataset folder appears only complete (README "Getting the data").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpt_lightning.data.archives import DatasetInstallError, free_bytes, gib, prepare_dataset
from dpt_lightning.data.audit import audit_dataset
from dpt_lightning.data.catalogue import CATALOGUE, CatalogueEntry, catalogue_entries


def cmd_list(args: argparse.Namespace) -> int:
    print(f"{'DIR':<11} {'modality / organ':<40} {'classes':>7} {'train/val/test':>18} {'images':>7}  source")
    for entry in CATALOGUE.values():
        facts = entry.facts
        counts = "/".join(map(str, entry.counts)) if entry.counts else "?"
        source = (f"{entry.archive.repo}: {entry.archive.filename}" if entry.archive else
                  "your own archives (dpt-data prepare)")
        print(f"{entry.name:<11} {facts.modality + ' / ' + facts.organ:<40} {len(facts.classnames):>7} {counts:>18} "
              f"{entry.images or '?':>7}  {source}")
    print("\nOrigins and licence notes (summaries; the source page's terms apply):")
    for entry in CATALOGUE.values():
        print(f"  {entry.name}: {entry.origin}, {entry.origin_url}\n      licence: {entry.licence}")
        if entry.counts_note:
            print(f"      counts: {entry.counts_note}")
    print("\nArchive sizes come from the hub: dpt-data download all --root DIR --dry-run")
    return 0


def _report_existing(entry: CatalogueEntry, root: Path) -> bool:
    """For a dataset already in ``root``: its check, printed; True when it is fine."""
    audit = audit_dataset(entry, root)
    if audit.matches:
        print(f"{entry.name}: already in {audit.folder}, check ok (dpt-data check --decode decodes every image)")
    else:
        print(audit.report())
    return audit.ok


def _installed(entry: CatalogueEntry, root: Path) -> bool:
    audit = audit_dataset(entry, root)
    print(audit.report())
    return audit.ok


def cmd_download(args: argparse.Namespace) -> int:
    from dpt_lightning.data.download import download_dataset, remote_size

    root = Path(args.root).expanduser()
    entries = catalogue_entries(args.names)
    if args.dry_run:
        return _dry_run(entries, root, remote_size)
    failed = []
    for entry in entries:
        try:
            if (root / entry.name).exists() and not args.replace:
                ok = _report_existing(entry, root)
            else:
                root.mkdir(parents=True, exist_ok=True)
                download_dataset(entry, root, replace=args.replace, keep_archive=args.keep_archive)
                ok = _installed(entry, root)
        except DatasetInstallError as err:
            print(f"dpt-data download: error: {err}", file=sys.stderr)
            ok = False
        except OSError as err:
            from dpt_lightning.data.archives import os_error_message

            print(f"dpt-data download: error: {os_error_message(err, f'{entry.name} in {root}')}", file=sys.stderr)
            ok = False
        if not ok:
            failed.append(entry.name)
    if failed and len(entries) > 1:
        print(f"dpt-data download: {len(failed)} of {len(entries)} datasets not ready: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


def _dry_run(entries: list[CatalogueEntry], root: Path, remote_size) -> int:
    total, status = 0, 0
    for entry in entries:
        where = root / entry.name
        if entry.archive is None:
            print(f"{entry.name}: not downloadable ({entry.licence}); {entry.fetch_command(root)}")
            continue
        if where.exists():
            print(f"{entry.name}: {where} exists (kept; --replace downloads it again)")
            continue
        try:
            size = remote_size(entry)
        except DatasetInstallError as err:
            print(f"dpt-data download: error: {err}", file=sys.stderr)
            status = 1
            continue
        total += size or 0
        print(f"{entry.name}: {entry.archive.repo}/{entry.archive.filename}, "
              f"{gib(size) if size is not None else 'size unknown'} -> {where}")
    print(f"in all {gib(total)} to download (about as much again while unpacking); {gib(free_bytes(root))} free "
          f"on the disk of {root}")
    return status


def cmd_prepare(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser()
    (entry,) = catalogue_entries([args.name])
    root.mkdir(parents=True, exist_ok=True)
    prepare_dataset(entry, [Path(a).expanduser() for a in args.archive], root, replace=args.replace)
    return 0 if _installed(entry, root) else 1


def cmd_check(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser()
    audits = [audit_dataset(entry, root, decode=args.decode) for entry in catalogue_entries(args.names)]
    for audit in audits:
        print(audit.report())
    bad = [audit.entry.name for audit in audits if not audit.matches]
    if len(audits) > 1:
        print(f"{len(audits)} datasets checked in {root}: {len(audits) - len(bad)} ok"
              + (f", {len(bad)} with problems ({', '.join(bad)})" if bad else ""))
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpt-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    names = {"nargs": "+", "metavar": "NAME", "help": "dataset folder names (dpt-data list), or all"}
    root = {"required": True, "help": "the folder that holds BTMRI/, BUSI/, ... (dpt's --data.root)"}

    p = commands.add_parser("list", help="the datasets, their sources, counts and licence notes")
    p.set_defaults(run=cmd_list)

    p = commands.add_parser("download", help="download, verify and unpack datasets into --root")
    p.add_argument("names", **names)
    p.add_argument("--root", **root)
    p.add_argument("--replace", action="store_true", help="replace a dataset folder that is already there")
    p.add_argument("--keep-archive", action="store_true",
                   help="keep the verified zip in ROOT/.dpt-data/ (default: removed once unpacked)")
    p.add_argument("--dry-run", action="store_true", help="print what would be downloaded and its size; write nothing")
    p.set_defaults(run=cmd_download)

    p = commands.add_parser("prepare", help="install a dataset from archives you downloaded yourself")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--root", **root)
    p.add_argument("--archive", nargs="+", required=True, metavar="FILE", help="the downloaded archive(s)")
    p.add_argument("--replace", action="store_true", help="replace a dataset folder that is already there")
    p.set_defaults(run=cmd_prepare)

    p = commands.add_parser("check", help="check datasets in --root against the published layout and counts")
    p.add_argument("names", **names)
    p.add_argument("--root", **root)
    p.add_argument("--decode", action="store_true", help="also decode every listed image (slow on large datasets)")
    p.set_defaults(run=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpt-data``; errors are one message on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyError as err:  # an unknown dataset name
        print(f"dpt-data {args.command}: error: {err.args[0]}", file=sys.stderr)
    except DatasetInstallError as err:
        print(f"dpt-data {args.command}: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"dpt-data {args.command}: interrupted; a partial download is kept in ROOT/.dpt-data/ and the same "
              "command resumes it", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
