"""Convert video-text corpora into the TFRecord store that stage-1/2 pre-training reads (docs/method.md §9.1): WebVid,
video2dataset webdataset shards and `files` output, Panda-70M / InternVid / WebVid-10M tables, frame folders; or a
decode-once frame store for fine-tuning. The converter is the `conversion` package; this is its command line.

Run `python frozen_tfrecord.py --help` for the full description.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import sys
from pathlib import Path

from conversion.convert import DEFAULT_OUTPUT_DIR, ConversionConfig, ConversionSummary, WorkerDied, convert
from conversion.decoders import DECODERS
from conversion.encoding import EncodeOptions
from conversion.sources import SampleFields
from conversion.tables import PRESETS, TableLayout
from conversion.verify import verify_store
from conversion.webdataset_input import DEFAULT_MAX_MEMBER_BYTES
from dataloaders.catalogue import ensure_catalogue, find_catalogue
from modules.errors import InputError

logger = logging.getLogger("frozen_tfrecord")

DESCRIPTION = """\
Convert video-text corpora into the TFRecord frame store that stage-1/2 pre-training reads (docs/method.md §9.1).

Inputs (one of):
  --video_dir DIR   videos, found by walking DIR once; the video id is the file name without its extension, so
                    WebVid's videos/<page_dir>/<videoid>.mp4, a flat DIR/<videoid>.mp4 and video2dataset's `files`
                    output (out/00000/<key>.mp4) all work. Captions come from --csv / --table; without tables,
                    from the <key>.txt / <key>.json beside each video when there are such files (video2dataset's
                    layout; a .json whose "status" is not "success" is a failure), else no labels are written.
  --webdataset SPEC tar shards as video2dataset writes them: <key>.mp4 (.webm, .mkv, ...) + <key>.txt +
                    <key>.json per sample. SPEC is a brace pattern (shards/{00000..00099}.tar), a folder of .tar
                    files, a file listing shards (.txt, one per line), or a shard; local or s3:// (a prefix ending in
                    / lists its .tar objects); repeat the flag for several. Shards are streamed one sample at a
                    time (memory stays bounded, nothing is extracted to disk); video members are decoded from memory
                    with PyAV. Caption: the .txt, else the .json "caption" (--caption_field picks a json field);
                    clip id: the sample key (--id_field takes a json field instead). One output shard per input
                    shard.
  --frames_dir DIR  (alias --input_dir) the original's input: one folder of pre-extracted frames per video,
                    DIR/<videoid>/*.jpg|png, read in sorted file-name order.
  --merge [DIR ...] write path.index, the labels and failures.tsv over the parts (--num_parts) converted into
                    DIR ... (default: --output_dir) without copying any shard; index paths are relative.
  --verify DIR      check a store instead of writing one: every index entry's record read (CRCs, Example,
                    frames), its clip id compared with the entry's, the labels checked against the index.
  --catalogue DIR   build the catalogue training maps for the store in DIR (a store of the original's or of an
                    earlier version; conversions write their own), so the ranks of a run never build it.

Tables (with --video_dir; repeat each flag for several files; with tables only the listed videos are converted):
  --csv FILE        WebVid metadata (results_2M_*.csv, results_10M_*.csv): columns videoid and name, picked by name.
  --table FILE      csv, tsv, jsonl or parquet, its columns named by --preset webvid|webvid10m|panda70m|internvid or
                    by --id_column / --video_column (a path relative to --video_dir), --caption_column and
                    optionally --start_column and --end_column (or --window_column: a list of [start, end] pairs).
                    Timestamps are seconds or [H]H:MM:SS[.fff]; list-valued columns (Panda-70M's timestamp and
                    caption) give one clip per entry. A window becomes clip <video id>_<k> (k: the window's index
                    among that video's windows in table order) with --num_frames frames sampled inside it;
                    frame_indices are frame numbers of the source video, and the record also stores clip_start,
                    clip_end (seconds) and source_id. Each source video is decoded once for all its windows.

Frames: --num_frames (12) frames sampled uniformly over the video or window (the middle frame of each of 12 equal
segments; every frame when there are fewer; 0 = keep every frame). A source that decodes to fewer than
--min_frames (2) frames is not stored: one frame (a still image, e.g. a JPEG named .mp4) is `not_a_video`, more a
`short_video`. Files and members are decoded with PyAV, only the frames the sampled ones depend on: exact
positions (a frame's number in presentation order, found from the packets' timestamps), the same frames as
OpenCV's FFmpeg backend decoding every frame from the first (--decoder opencv, the original's extractor). A source
whose timestamps or packets make seeking unsafe is decoded from its first frame and noted as `decoded_sequentially`.
Default layout: each frame JPEG-encoded (--jpeg_quality) with its shorter side scaled down to --short_side
(never up), in a tf.train.Example with keys video_id, num_frames, height, width, frame_format, frame_indices,
frames (see dataloaders/webvid.py). --raw writes the original's layout instead: one `image` feature with the raw
N x 256 x 256 x 3 BGR bytes (bilinear resize, aspect not kept; about 2.4 MB per 12-frame clip).

FRAME STORE (--feature_framerate N): a decode-once store for fine-tuning (MSR-VTT, MSVD, LSMDC, DiDeMo,
captioning, QA; pass it as --frame_store). Every video under --video_dir is decoded once with the fine-tuning
loaders' own sampler (N frames per second, 0 = every frame), each frame resized and center-cropped to
--image_size as they do, and stored as PNG (lossless; --frame_format jpeg for a smaller, slightly different
store) with its frame number and the video's fps. The loaders then read these frames instead of the video and
apply their usual selection, order, time window and padding: the same clips as decoding the videos. The store
also gets <name>.frame_store.json with the sampling; a run whose --feature_framerate or input size differs
refuses the store. Records are keyed by file name without extension; --csv, if given, limits the store to its ids.

Outputs in --output_dir (default ./WebVid_TFRecord, the training scripts' default --dir_path):
  <name>-00000.tfrecord ...     --shard_size (1000) clips per shard (one per input shard for --webdataset);
                                standard TFRecord framing, masked CRC32C
  <name>.index                  video_id<TAB>shard file (relative to the index's folder)<TAB>byte offset
  frozen_train_labels.json      [{"video_id", "caption"}] for the clips actually written (when there are captions),
                                one object per line
  frozen_train_labels.catalogue.arrow  the same labels with their shard, offset and record length: what training
                                maps (Arrow IPC; docs/data.md §2.1)
  failures.tsv                  every row, sample or clip not stored: kind, video id, where (file:line,
                                <shard>:<key> or the video's path), detail; and notes on stored clips:
                                `fewer_frames` (fewer frames than asked for), `decoded_sequentially`
  <name>-00000.meta.json ...    per-shard sidecars (resume state; the final files are assembled from them)

Shards are planned from the sorted list of ids (or the list of input shards), so the same inputs always give the
same shards. Each shard is written under a unique temporary name, read back and verified (every record's CRC
and Example), and renamed when complete; its sidecar is written atomically afterwards. A re-run skips the shards
whose sidecar matches the plan and the options, so an interrupted conversion resumes and ends with files
byte-identical to an uninterrupted run. Bad rows, samples and videos are reported in failures.tsv and skipped,
never fatal; a clip id already stored is reported (duplicate_id) and the first kept. Exit status: 0 when every
shard is complete, 1 when no clip was written or an I/O error or a worker process that died (a crash inside a
decoder) stopped the run (re-run to resume), 2 for bad input
(a missing folder, csv or table, a table without the needed columns, nothing to convert), 130 stopped by Ctrl-C
(SIGINT; complete shards kept, re-run to resume).

Over many machines: --num_parts N --part K converts the shards n with n mod N == K (a SLURM array: --part
$SLURM_ARRAY_TASK_ID) into one --output_dir on shared storage or N folders; each part resumes like a whole
conversion; then --merge [DIR ...] lists all of them: the same clips as one conversion of the same input.

The output folder can be moved, mounted elsewhere or copied to s3://bucket/prefix/ as it is: readers resolve
shard paths against the index's location (read_frames / WebVidDataset accept s3:// paths; boto3 settings such
as AWS_ENDPOINT_URL come from the environment).

Examples:
  python frozen_tfrecord.py --video_dir webvid/videos --csv webvid/results_2M_train.csv --workers 16
  python frozen_tfrecord.py --webdataset 'openvid/{00000..00099}.tar' --output_dir OpenVid_TFRecord --workers 16
  python frozen_tfrecord.py --video_dir panda70m/videos --table panda70m_training_2m.csv --preset panda70m
  python frozen_tfrecord.py --video_dir internvid/videos --table InternVid-10M-FLT.jsonl --preset internvid
  python frozen_tfrecord.py --frames_dir webvid_frames --csv results_2M_train.csv --csv results_2M_val.csv --raw
  python frozen_tfrecord.py --video_dir MSRVTT/videos/all --feature_framerate 1 --output_dir MSRVTT/frame_store
  python frozen_tfrecord.py --catalogue /data/WebVid_TFRecord     # a store converted elsewhere, once
  python main_task_clip.py --data_path WebVid_TFRecord/frozen_train_labels.json --dir_path WebVid_TFRecord ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video_dir", help="folder of videos (walked recursively; id = file stem)")
    source.add_argument("--frames_dir", "--input_dir", dest="frames_dir",
                        help="folder of per-video frame folders <dir>/<videoid>/*.jpg|png (the original's input)")
    source.add_argument("--webdataset", action="append", metavar="SPEC",
                        help="webdataset tar shards: brace pattern, folder, shard list or shard; local or s3://")
    source.add_argument("--merge", nargs="*", metavar="DIR",
                        help="merge the parts converted into these folders (default: --output_dir)")
    source.add_argument("--verify", metavar="DIR",
                        help="check the store in DIR: every record readable and naming its clip, the labels "
                             "(--labels_name) all in the index; exit 0 when it is sound, 1 when not")
    source.add_argument("--catalogue", metavar="DIR",
                        help="build the catalogue training maps for the store in DIR (its labels --labels_name and "
                             "index <--output_name>.index), once, ahead of a run: beside the labels, or in "
                             "--catalogue_cache when DIR cannot be written; nothing is done when it is up to date")
    parser.add_argument("--catalogue_cache", metavar="DIR", default=None,
                        help="with --catalogue: where the catalogue goes when the store's folder cannot be written "
                             "(default $T2VLP_CATALOGUE_CACHE, else ~/.cache/t2vlp/catalogues; give training the "
                             "same --catalogue_cache)")
    parser.add_argument("--csv", action="append", default=[], dest="csv_paths", metavar="FILE",
                        help="WebVid csv with videoid and name columns; repeat for several files")
    tables = parser.add_argument_group("tables of videos or clips (with --video_dir)")
    tables.add_argument("--table", action="append", default=[], metavar="FILE",
                        help="csv, tsv, jsonl or parquet table; repeat for several")
    tables.add_argument("--preset", choices=sorted(PRESETS), help="the column names of a known table layout")
    for column, what in [("id", "the video id (file name without extension under --video_dir)"),
                         ("video", "the video's path relative to --video_dir"), ("caption", "the caption"),
                         ("start", "the clip's start (seconds or [H]H:MM:SS[.fff])"), ("end", "the clip's end"),
                         ("window", "a list of [start, end] pairs, one clip each")]:
        tables.add_argument(f"--{column}_column", help=f"the column of {what}")
    samples = parser.add_argument_group("video2dataset samples (--webdataset, and .json beside --video_dir videos)")
    samples.add_argument("--caption_field", help="take the caption from this .json field instead of the .txt")
    samples.add_argument("--id_field", help="take the clip id from this .json field (e.g. videoid) instead of the key")
    samples.add_argument("--max_member_bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                         help="a webdataset member whose tar header declares more bytes is refused unread, its sample "
                              f"reported as too_large (default {DEFAULT_MAX_MEMBER_BYTES} = 2 GiB)")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"where shards, index, labels and failures.tsv go (default {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--output_name", default="path", help="shard/index file name prefix (default: path)")
    parser.add_argument("--labels_name", default="frozen_train_labels.json",
                        help="labels file name (default frozen_train_labels.json)")
    parser.add_argument("--shard_size", type=int, default=1000, help="clips per shard (default 1000)")
    parser.add_argument("--num_frames", type=int, help="frames sampled per clip; 0 keeps all (12)")
    parser.add_argument("--min_frames", type=int, default=2,
                        help="sources with fewer decodable frames are not stored (default 2: no still images)")
    parser.add_argument("--decoder", choices=DECODERS,
                        help="video file decoder: pyav (default) decodes only the frames the sampled ones depend on; "
                             "opencv decodes every frame from the first, as the original's extractor (the same "
                             "frames, slower); webdataset members are always decoded from memory with PyAV")
    parser.add_argument("--short_side", type=int, help="frames: shorter side, never upscaled (256)")
    parser.add_argument("--resize", choices=("area", "swscale"), default="area",
                        help="how frames are scaled to --short_side: 'area' (default) OpenCV's INTER_AREA after the "
                             "colour conversion; 'swscale' PyAV's colour conversion and area resize in one call "
                             "(PyAV's: not with --decoder opencv; faster, other pixels: "
                             "see docs/data.md §1.1)")
    parser.add_argument("--jpeg_quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    parser.add_argument("--frame_format", choices=("jpeg", "png"),
                        help="image format of the frames: jpeg (default for WebVid) or png (lossless; default for "
                             "a frame store)")
    parser.add_argument("--raw", action="store_true", help="write the original's raw 256x256 BGR `image` layout")
    store = parser.add_argument_group("downstream frame store (see FRAME STORE above)")
    store.add_argument("--feature_framerate", type=int,
                       help="write a frame store: frames sampled per second exactly as the fine-tuning loaders' "
                            "flag of the same name (0: every frame)")
    store.add_argument("--image_size", type=int, default=224,
                       help="frame store: frames resized and center-cropped to this size, the model's (224)")
    parts = parser.add_argument_group("conversion over many machines")
    parts.add_argument("--num_parts", type=int, default=1, help="split the conversion into this many parts (1)")
    parts.add_argument("--part", type=int, default=0, help="the part this run converts, 0 .. num_parts - 1")
    tables.add_argument("--allow_outside_paths", action="store_true",
                        help="read a table's video paths that are absolute or lead above --video_dir (refused and "
                             "reported as outside_video_dir by default)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes; 0 decodes in this process (default: CPU count)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> ConversionConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = _encode_options(parser, args)
    if args.shard_size < 1 or options.num_frames < 0 or options.short_side < 1 or not 1 <= args.jpeg_quality <= 100:
        parser.error("need --shard_size >= 1, --num_frames >= 0, --short_side >= 1, 1 <= --jpeg_quality <= 100")
    if args.min_frames < 1:
        parser.error("need --min_frames >= 1")
    if args.max_member_bytes < 1:
        parser.error("need --max_member_bytes >= 1")
    if args.num_parts < 1 or not 0 <= args.part < args.num_parts:
        parser.error(f"need --num_parts >= 1 and 0 <= --part < --num_parts, got --part {args.part} of "
                     f"{args.num_parts}")
    if (args.table or args.csv_paths) and args.webdataset:
        parser.error("--csv and --table list videos under --video_dir (or frame folders); webdataset shards carry "
                     "their captions")
    return ConversionConfig(
        args.output_dir, args.video_dir, args.frames_dir, args.csv_paths, args.output_name, args.labels_name,
        args.shard_size, args.workers, not args.no_progress, options, tables=_tables(parser, args),
        webdataset=args.webdataset or [], fields=SampleFields(args.caption_field, args.id_field),
        num_parts=args.num_parts, part=args.part, merge_dirs=args.merge, allow_outside_paths=args.allow_outside_paths,
        max_member_bytes=args.max_member_bytes,
    )


def _tables(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, TableLayout]]:
    columns = {f"{name}_column": getattr(args, f"{name}_column")
               for name in ("id", "video", "caption", "start", "end", "window")}
    given = {key: value for key, value in columns.items() if value is not None}
    if not args.table:
        if args.preset or given:
            parser.error("--preset and the --*_column flags describe --table files; give --table")
        return []
    if args.preset is None and not given:
        parser.error("name the table's columns: --preset webvid|webvid10m|panda70m|internvid, or --id_column / "
                     "--video_column and --caption_column (with --start_column/--end_column for clips)")
    layout = TableLayout(**{**(vars(PRESETS[args.preset]) if args.preset else {}), **given})
    if layout.id_column is None and layout.video_column is None:
        parser.error("a table needs --id_column or --video_column to find its videos")
    if (layout.start_column is None) != (layout.end_column is None):
        parser.error("--start_column and --end_column go together")
    return [(path, layout) for path in args.table]


def _encode_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EncodeOptions:
    if args.feature_framerate is None:
        sizes = {name: value for name, value in (("num_frames", args.num_frames), ("short_side", args.short_side))
                 if value is not None}  # unset: EncodeOptions' defaults
        if args.resize == "swscale" and (args.raw or args.frames_dir or
                                         (args.decoder == "opencv" and not args.webdataset)):
            parser.error("--resize swscale is PyAV's: not with --decoder opencv (webdataset members always use PyAV); "
                         "it does not apply to --raw or --frames_dir")
        return EncodeOptions(**sizes, jpeg_quality=args.jpeg_quality, raw=args.raw,
                             frame_format=args.frame_format or "jpeg", decoder=args.decoder or DECODERS[0],
                             min_frames=args.min_frames, resize=args.resize)
    given = [flag for flag, value in (("--num_frames", args.num_frames), ("--short_side", args.short_side),
                                      ("--raw", args.raw or None), ("--frames_dir", args.frames_dir),
                                      ("--webdataset", args.webdataset), ("--table", args.table or None),
                                      (f"--decoder {args.decoder}", args.decoder),
                                      ("--resize swscale", args.resize == "swscale" or None)) if value is not None]
    if given:
        parser.error(f"a frame store (--feature_framerate) keeps every sampled frame at --image_size from "
                     f"--video_dir, decoded as the fine-tuning loaders do: {', '.join(given)} does not apply")
    if args.feature_framerate < 0 or args.image_size < 1:
        parser.error("need --feature_framerate >= 0 and --image_size >= 1")
    return EncodeOptions(num_frames=0, jpeg_quality=args.jpeg_quality, frame_format=args.frame_format or "png",
                         feature_framerate=args.feature_framerate, image_size=args.image_size)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a conversion that wrote no clip or stopped on an I/O error or a worker that died
    (complete shards are kept: re-run to resume), 2 bad input (a missing folder, csv or table, a table without the needed columns,
    nothing to convert), 130 stopped by Ctrl-C (complete shards are kept: re-run to resume)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.verify is not None:
        return run_verify(args.verify, args.labels_name)
    if args.catalogue is not None:
        return run_catalogue(args.catalogue, args.labels_name, args.output_name, args.catalogue_cache)
    config = parse_args(argv)
    try:
        summary = convert(config)
    except KeyboardInterrupt:
        kept = len(list(Path(config.output_dir).glob(f"{config.output_name}-*.meta.json")))
        print(f"frozen_tfrecord.py: stopped; {kept} complete shard(s) kept in {config.output_dir}; rerun the same "
              f"command to resume", file=sys.stderr, flush=True)
        return 130
    except InputError as error:
        print(f"frozen_tfrecord.py: error: {error}", file=sys.stderr, flush=True)
        return 2
    except (OSError, WorkerDied) as error:
        logger.error("conversion stopped (%s); complete shards are kept, re-run the same command to resume", error)
        return 1
    return report(config, summary)


def run_verify(folder: str, labels_name: str) -> int:
    try:
        check = verify_store(folder, labels_name)
    except (OSError, ValueError) as error:  # no index, a malformed index line, unreadable labels
        print(f"frozen_tfrecord.py: error: --verify {folder}: {error}", file=sys.stderr, flush=True)
        return 2
    print("\n".join(check.report()), flush=True)
    return 0 if check.ok else 1


def run_catalogue(folder: str, labels_name: str, output_name: str, cache_dir: str | None) -> int:
    labels, index = posixpath.join(folder, labels_name), posixpath.join(folder, f"{output_name}.index")
    try:
        found = find_catalogue(labels, index, cache_dir)
        catalogue = found or ensure_catalogue(labels, index, cache_dir)
    except (OSError, ValueError) as error:  # no labels or index, a malformed index line, labels that are not JSON
        print(f"frozen_tfrecord.py: error: --catalogue {folder}: {error}", file=sys.stderr, flush=True)
        return 2
    info = catalogue.info
    print(f"{'up to date' if found else 'built'}: {catalogue.path}: {info.n_rows} labels, {len(info.shards)} "
          f"shard path(s) in the index, {info.n_missing} without a record in the index, {info.n_duplicate_ids} "
          f"repeated index line(s) (the first of each used)", flush=True)
    return 0


def report(config: ConversionConfig, summary: ConversionSummary) -> int:
    out = Path(config.output_dir)
    logger.info("%s", summary.report())
    if config.num_parts > 1:
        logger.info("part %d of %d is complete; when every part is, merge them: python frozen_tfrecord.py --merge "
                    "[the parts' folders] --output_dir %s", config.part, config.num_parts, out)
        if summary.n_shards and not summary.n_written:
            logger.error("this part wrote no clip: see the failures in its shards' sidecars")
            return 1
        return 0
    if summary.n_selected == 0 and not summary.n_input_shards:
        source = (f"--video_dir {config.video_dir}" if config.video_dir else f"--frames_dir {config.frames_dir}")
        why = (f"no video under {source}" if summary.n_sources_found == 0 else
               f"none of the {summary.n_sources_found} videos under {source} is listed with a caption (see "
               f"{out / 'failures.tsv'})")
        print(f"frozen_tfrecord.py: error: nothing to convert: {why}", file=sys.stderr, flush=True)
        return 2
    logger.info("wrote %s, failures in %s", out / f"{config.output_name}.index", out / "failures.tsv")
    if summary.n_written == 0:
        logger.error("no video was written (%d selected): see %s", summary.n_selected, out / "failures.tsv")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
