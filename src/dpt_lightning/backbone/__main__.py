"""``python -m dpt_lightning.backbone``: prepare backbone folders for offline use.

    python -m dpt_lightning.backbone download NAME FOLDER        # any backbone name -> local-dir folder
    python -m dpt_lightning.backbone convert-hf-clip SOURCE FOLDER  # a transformers CLIPModel (PubMedCLIP)
    python -m dpt_lightning.backbone info NAME                   # load it and print its tower facts
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpt_lightning.backbone", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="write the local-dir: folder of a backbone (needs internet)")
    download.add_argument("name", help="hf-hub:<repo>, openclip:<architecture>/<tag>, hf-clip:<repo>, or tiny...")
    download.add_argument("folder")
    convert = commands.add_parser("convert-hf-clip", help="convert a transformers CLIPModel into a local-dir: folder")
    convert.add_argument("source", help="a hub repository id or a folder of a transformers CLIPModel")
    convert.add_argument("folder")
    info = commands.add_parser("info", help="load a backbone and print its tower families and facts")
    info.add_argument("name")
    args = parser.parse_args(argv)

    from dpt_lightning.backbone.convert import ConversionError
    from dpt_lightning.backbone.loading import BackboneLoadError

    try:
        if args.command == "download":
            from dpt_lightning.backbone.loading import download_backbone

            folder = download_backbone(args.name, args.folder)
            print(f"wrote {folder}: use --model.backbone local-dir:{folder.resolve()}")
        elif args.command == "convert-hf-clip":
            from dpt_lightning.backbone.convert import convert_hf_clip

            folder = convert_hf_clip(args.source, args.folder)
            print(f"wrote {folder}: use --model.backbone local-dir:{folder.resolve()}")
        else:
            from dpt_lightning.backbone.model import Backbone

            backbone = Backbone(args.name)
            print(json.dumps({"text": {"family": backbone.text_tower.family, **dataclasses.asdict(backbone.text_facts)},
                              "image": {"family": backbone.image_tower.family,
                                        **dataclasses.asdict(backbone.image_facts)}}, indent=2))
    except (BackboneLoadError, ConversionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
