"""``llava-sessions tiny-model`` and ``archive``: the offline checkpoint and the TorchServe archive."""

from __future__ import annotations

from pathlib import Path

from llava_sessions.commands import archive_from_args, model_arguments


def register(commands) -> None:
    tiny = commands.add_parser("tiny-model", help="write the offline random-weight LLaVA checkpoint")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--family", default="llava", choices=["llava", "llava-siglip", "next", "onevision"],
                      help="llava: LLaVA-1.5 (CLIP tower, Vicuna template); llava-siglip: a SigLIP LLaVA "
                      "such as llava-interleave-qwen (no CLS token, ChatML template); next: LLaVA-NeXT "
                      "such as llava-v1.6-mistral (anyres tiles, Mistral [INST] template); onevision: LLaVA-OneVision "
                      "such as llava-onevision-qwen2 (SigLIP over anyres tiles, ChatML; images only)")
    tiny.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_tiny_model)

    archive = commands.add_parser("archive", help="build the TorchServe model archive")
    model_arguments(archive)
    archive.add_argument("--out", type=Path, required=True, help="folder to write the archive into")
    archive.add_argument("--format", default="no-archive", choices=["no-archive", "default", "tgz"],
                         help="no-archive: a folder TorchServe loads in place, no copy of the weights "
                         "(what `serve` and `upload` use); default: one .mar file; tgz: one .tar.gz")
    archive.set_defaults(run=cmd_archive)


def cmd_tiny_model(args) -> int:
    from llava_sessions.errors import ConfigError
    from llava_sessions.tiny_model import geometry_of, write_tiny_llava

    try:
        geometry_of(args.preset, args.family)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    path = write_tiny_llava(args.dir, preset=args.preset, seed=args.seed, family=args.family)
    print(f"wrote a random-weight LLaVA ({args.family} {args.preset}, seed {args.seed}) to {path}")
    return 0


def cmd_archive(args) -> int:
    from llava_sessions import models

    archive = archive_from_args(args, models.resolve_model(args.model), args.out, args.format)
    print(f"archive: {archive}")
    return 0
