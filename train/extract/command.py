"""``dit extract``: T5 features with masks and VAE latent mean/std, written as safetensors shards.

Training can then run from these features without loading T5 or the VAE, as PixArt trains. Images go to the
nearest PixArt aspect-ratio bin of the chosen resolution (resized to cover, centre-cropped), so each shard holds
one bucket; resolutions without PixArt bins (256/512/1024/2048 px) use the nearest bin set scaled to them.
With ``--control silhouette|edges|FOLDER`` each shard also holds the ControlNet control latents
(``control_latent``), computed from each image or read from FOLDER (one control image per image, same file name).

Nothing is lost to a crash or a bad sample:

* shards are written as the run goes, every ``--shard-size`` samples of a bucket (the remainder at the end), each
  under a temporary name and then renamed; after each shard, the process's progress file
  ``extract_progress-p{rank}.json`` (written atomically) lists the shards and the record indices they hold;
* re-running into the same ``--out`` resumes: records already in listed shards are skipped, and shards that no
  progress file lists (a crash between rename and progress) are deleted and redone. ``extract_config.json``
  records the settings; resuming with another pipeline, resolution, max_length, bucketing, control, source or data
  is an error naming the difference;
* a broken sample (unreadable or missing image, no caption field, a malformed ``metadata.jsonl`` line, a missing
  control image) is skipped alone and listed with its reason (and metadata line) in
  ``extract_report-p{rank}.json``. An empty caption is a valid unconditional sample (``--skip-empty-captions``
  drops those instead).

The report also says whether the pipeline can represent the data (:mod:`dit.train.extract.checks`): the share of
caption words its tokenizer maps to ``<unk>`` and its VAE's reconstruction PSNR on a few images; when either is
poor, one line warns and names what to use instead.

Under ``accelerate launch`` (``-m dit.train.extract`` or ``dit extract``) process ``rank`` of ``world`` takes the
records whose index is ``rank`` modulo ``world`` and writes its own shards (``HxW-p{rank}-NNNNN.safetensors``),
progress file and report.
"""

# The command (dit.cli's convention: add_parser and run; main for `python -m dit.train.extract`): its arguments are
# parsed before the extraction (dit.train.extract.extraction: torch, the encoders) is imported, so `dit extract --help`
# answers at once.

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dit.errors import removed_if_left_empty, run_command, take_debug_flag

from .sources import SOURCES

HELP = (
    "pre-extract T5 features and VAE latents (resumable; --control for ControlNet): "
    "dit extract DATA --pipeline P --out D"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``dit extract``'s arguments."""
    parser.add_argument("data", help="image folder, tar shards folder, or saved HF dataset")
    parser.add_argument("--source", default="imagefolder", choices=list(SOURCES))
    parser.add_argument("--pipeline", required=True, help="pipeline folder with tokenizer/, text_encoder/ and vae/")
    parser.add_argument("--out", required=True, help="output folder for the feature shards (re-run to resume)")
    parser.add_argument("--resolution", type=int, default=256, help="training side in pixels (default 256)")
    parser.add_argument("--max-length", type=int, default=120, help="T5 tokens per caption (default 120)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1024, help="samples per shard; a crash loses at most one")
    parser.add_argument("--no-bucketing", action="store_true", help="square centre crops instead of PixArt's bins")
    parser.add_argument("--control", metavar="silhouette|edges|FOLDER",
                        help="also write ControlNet control latents: computed from each image (objects on a plain "
                        "background), or read from FOLDER (one control image per image, same file name)")  # fmt: skip
    parser.add_argument("--skip-empty-captions", action="store_true",
                        help="skip samples with an empty caption (default: keep them as unconditional samples)")  # fmt: skip


def add_parser(commands) -> None:
    """The ``dit extract`` subcommand of ``commands`` (argparse sub-parsers)."""
    parser = commands.add_parser(
        "extract", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.set_defaults(func=run, user_errors=user_errors)


def user_errors() -> dict[type[BaseException], int]:
    """What ``dit extract`` prints as one line ``error: ...``: a bad value or missing data (2), a write error (1)."""
    from .progress import ExtractError

    return {ExtractError: 2, FileNotFoundError: 2, OSError: 1}


def run(args: argparse.Namespace) -> int:
    """Extract; a failed start leaves no new empty ``--out``."""
    from .extraction import REPORT_FILE, extract

    with removed_if_left_empty(args.out):
        report = extract(
            args.source, args.data, args.pipeline, args.out, args.resolution, args.max_length, args.batch_size,
            args.shard_size, not args.no_bucketing, args.control, args.skip_empty_captions,
        )  # fmt: skip
    file = Path(args.out) / REPORT_FILE.format(rank=report["rank"])
    print(
        f"dit extract (rank {report['rank']} of {report['world_size']}): {report['written']} samples written, "
        f"{report['resumed']} already in shards, {report['broken']} broken skipped, buckets {report['buckets']} "
        f"(report: {file})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dit.train.extract`` (also under ``accelerate launch``); a bad value is one line ``error: ...`` and
    exit code 2 (``--debug``: its traceback)."""
    parser = argparse.ArgumentParser(
        prog="dit extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(take_debug_flag(sys.argv[1:] if argv is None else argv))
    return run_command(lambda: run(args), user_errors)
