"""The ``sagevideo`` command line: ``generate``, ``compare``, ``bench``, ``env``.

Exit status: 0 success; 1 the run itself failed (an unexpected error, traceback printed); 2 bad input or an
unsupported setup (unknown model, unsupported pipeline, size the model cannot take, output not writable, a
GPU-only attention method on CPU without ``--allow-reference``, ``bench`` without a GPU), with a one-line
message on stderr that names the fix. See ``docs/cli.md``.

Heavy imports (diffusers, the model) happen inside the subcommands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2

_MODEL_HELP = (
    "diffusers pipeline to use: a Hugging Face id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or a local folder "
    "written by save_pretrained. Default: the bundled tiny-wan model in assets/ (if that folder holds no model, a tiny "
    "random-weight Wan pipeline whose output is noise, with a notice)"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _attention_choices() -> list[str]:
    from sagevideo import methods

    return list(methods.names())


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: the pipeline's own)")
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    choices = _attention_choices()
    p.add_argument(
        "--attention", default=None, choices=choices, metavar="METHOD",
        help="attention method for every DiT self-attention call: " + ", ".join(choices)
        + ". Default: the model family's default schedule ('auto': int8-fp8 on sm89+ GPUs, int8-fp16 on "
        "sm80, dense on CPU). Quantized methods need a CUDA GPU unless --allow-reference",
    )
    p.add_argument(
        "--profile", default=None, metavar="NAME_OR_JSON",
        help="attention schedule instead of --attention: a shipped profile name (see `sagevideo env`), a JSON "
        "file written by AttentionConfig.save / sagevideo.calibrate, or inline JSON",
    )
    p.add_argument(
        "--allow-reference", action="store_true",
        help="allow quantized methods on CPU: runs the torch reference of the quantized arithmetic (same numbers "
        "as the GPU kernel, no speed-up, slower than dense). Without it they are an error on CPU",
    )
    p.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--frames", type=_positive_int, default=None,
                   help="number of frames; Wan/HunyuanVideo/CogVideoX take 1 + 4k (default: the model's)")
    p.add_argument("--height", type=_positive_int, default=None,
                   help="height in pixels; a multiple of VAE scale x patch size, 16 for Wan (default: the model's)")
    p.add_argument("--width", type=_positive_int, default=None,
                   help="width in pixels; same rule as --height (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (CPU generator; default 0)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the written videos (default: 16)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto (default) = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--cpu-offload", action="store_true",
                   help="enable_model_cpu_offload() for models that do not fit in GPU memory")
    p.add_argument("--no-progress", action="store_true", help="hide the per-step progress bars")


GENERATE_EPILOG = """\
examples:
  sagevideo generate --prompt "a red circle moves left quickly on a black background." --output out.mp4
  sagevideo generate --prompt "a cat walks on the grass" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
      --attention int8-fp8 --frames 81 --height 480 --width 832 --steps 30 --output cat.mp4
  sagevideo generate --prompt "..." --model ./my-pipeline --profile warmup --output clip.gif --frames-dir frames/
  sagevideo generate --prompt "..." --attention int8-fp8 --allow-reference --steps 2 --output cpu.mp4   # CPU
"""

COMPARE_EPILOG = """\
examples:
  sagevideo compare --prompt "a cat walks on the grass" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
      --profile warmup --steps 30 --output report/
  sagevideo compare --prompt "a red circle moves left." --attention int8-fp8 --allow-reference \\
      --steps 4 --frames 9 --height 64 --width 64 --output cpu-report/          # on a CPU-only machine

The report folder holds metrics.json (per-frame and mean PSNR, SSIM, LPIPS; wall times, speed-up, schedule,
versions, GPU), side_by_side.mp4 (dense | accelerated | amplified difference) and report.html (opens offline).
Metrics are computed on the decoded frames, before video encoding.
On CPU, 'auto' runs dense, so comparing it measures nothing: pass --attention int8-fp8 (or a profile) with
--allow-reference to measure the quantized arithmetic's fidelity (the speed-up is then marked not meaningful).
"""

BENCH_EPILOG = """\
examples:
  sagevideo bench                                   # every shape, int8-fp8 and int8-fp16
  sagevideo bench --shapes wan2.1-1.3b-480p --modes int8-fp8 --rep-ms 500 --json bench.json
  sagevideo bench --shapes wan2.1-14b-720p --modes int8-fp8 sparse-spatiotemporal sparse-semantic

The sparse modes time the whole sparse_attention call (pattern search included, warm state) on inputs with
locality over the shape's latent grid; their cos / rel-L1 are against dense float32 attention.

Needs a CUDA GPU; without one it says so and exits with status 2.
"""

ENV_EPILOG = """\
examples:
  sagevideo env           # paste the output into bug reports
  sagevideo env --json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sagevideo",
        description="Quantized attention for video diffusion transformers (Wan, HunyuanVideo, CogVideoX), "
        "with a fidelity check built in.",
        epilog="run `sagevideo COMMAND --help` for each command's options and examples",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate a video with accelerated attention", epilog=GENERATE_EPILOG,
                       formatter_class=_Formatter,
                       description="Generate one video; prints the time spent and where the file went.")
    _add_run_args(g)
    g.add_argument("--output", "-o", default="out.mp4", help="video file to write, .mp4 or .gif (default: out.mp4)")
    g.add_argument("--frames-dir", default=None, help="also write every frame as a lossless PNG into this folder")

    c = sub.add_parser("compare", help="dense vs accelerated with the same seed, fidelity report",
                       epilog=COMPARE_EPILOG, formatter_class=_Formatter,
                       description="Run the model dense (unpatched) and accelerated with the same seed and write a "
                       "report folder.")
    _add_run_args(c)
    c.add_argument("--output", "-o", default="sagevideo-report", help="report folder to write, created if needed (default: sagevideo-report)")
    c.add_argument("--warmup-steps", type=_nonneg_int, default=None,
                   help="untimed warm-up steps per configuration before the timed runs (default: 1 on CUDA, 0 on CPU)")

    b = sub.add_parser("bench", help="attention kernel benchmark on this machine's GPU", epilog=BENCH_EPILOG,
                       formatter_class=_Formatter,
                       description="Time sagevideo's quantized (and, on request, sparse) attention against torch SDPA (and other installed "
                       "kernels) and print the table with ratios against SDPA-cuDNN.")
    b.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="benchmark shapes (default: all): " + ", ".join(_bench_shapes()))
    b.add_argument("--modes", nargs="+", default=["int8-fp8", "int8-fp16"], choices=_bench_modes(),
                   help="sagevideo modes to time (default: int8-fp8 int8-fp16; the sparse ones on request)")
    b.add_argument("--rep-ms", type=_positive_int, default=2000, help="measuring time per provider in milliseconds (default: 2000)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the rows and environment to this JSON file")

    e = sub.add_parser("env", help="print versions, CUDA and GPU (for bug reports)", epilog=ENV_EPILOG,
                       formatter_class=_Formatter, description="Print the environment sagevideo runs in.")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _version() -> str:
    try:
        from sagevideo import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _bench_modes() -> list[str]:
    from sagevideo import bench

    return list(bench.MODES)


def _bench_shapes() -> list[str]:
    # bench.SHAPES without importing bench's GPU dependencies at parse time (bench imports only torch at top)
    from sagevideo import bench

    return list(bench.SHAPES)


# ------------------------------------------------------------------------------------------------ helpers


def _err(msg: str) -> None:
    print(f"sagevideo: error: {msg}", file=sys.stderr)


def _info(msg: str) -> None:
    print(msg, file=sys.stderr)


def _check_output_file(path: str) -> Path:
    from sagevideo.generate import InputError
    from sagevideo.video_io import VIDEO_EXTENSIONS, VideoWriteError, _ensure_writable_dir, mp4_unavailable_reason

    out = Path(path).expanduser()
    if out.suffix.lower() not in VIDEO_EXTENSIONS:
        raise InputError(f"--output {path}: unsupported extension {out.suffix or '(none)'!r}; use "
                         + " or ".join(VIDEO_EXTENSIONS) + " (and --frames-dir for PNG frames)")
    if out.is_dir():
        raise InputError(f"--output {path} is a folder; give a file name ending in .mp4 or .gif")
    try:
        _ensure_writable_dir(out.parent if str(out.parent) else Path("."))
    except VideoWriteError as exc:
        raise InputError(f"--output {path}: {exc}; choose a writable location") from None
    if out.suffix.lower() == ".mp4":
        reason = mp4_unavailable_reason()  # before generating, not after
        if reason is not None:
            raise InputError(f"--output {path}: {reason}")
    return out


def _check_output_dir(path: str, flag: str) -> Path:
    from sagevideo.generate import InputError
    from sagevideo.video_io import VideoWriteError, _ensure_writable_dir

    out = Path(path).expanduser()
    try:
        _ensure_writable_dir(out)
    except VideoWriteError as exc:
        raise InputError(f"{flag} {path}: {exc}; choose a writable location") from None
    return out


def _prepare(args):
    """Load the model and run every check; returns (pipe, source, config, settings, notice, device)."""
    from sagevideo import generate as gen

    device = gen.resolve_device(args.device)
    pipe, source = gen.load_pipeline(args.model, device=device, dtype=args.dtype, cpu_offload=args.cpu_offload,
                                     log=_info)
    if source.notice:
        _info(source.notice)
    family = gen.pipeline_family(pipe)
    config = gen.build_config(family, args.attention, args.profile)
    defaults = {**gen.call_defaults(pipe), **source.defaults}
    settings = {
        "steps": args.steps if args.steps is not None else defaults.get("steps"),
        "frames": args.frames if args.frames is not None else defaults.get("frames"),
        "height": args.height if args.height is not None else defaults.get("height"),
        "width": args.width if args.width is not None else defaults.get("width"),
        "guidance": args.guidance if args.guidance is not None else defaults.get("guidance"),
        "seed": args.seed,
        "negative_prompt": args.negative_prompt,
    }
    fps = args.fps if args.fps is not None else float(defaults.get("fps", 16.0))
    if not fps > 0:
        raise gen.InputError(f"--fps must be positive, got {fps}")
    _, notice = gen.check_request(pipe, frames=settings["frames"], height=settings["height"],
                                  width=settings["width"], config=config, device=device,
                                  allow_reference=args.allow_reference)
    if notice:
        _info(notice)
    return pipe, source, config, settings, fps


def _describe_config(config) -> str:
    from sagevideo.generate import is_dense

    if is_dense(config):
        return "dense (unpatched)"
    if not config.rules:
        return config.default
    return f"schedule ({len(config.rules)} rule(s), default {config.default})"


# ------------------------------------------------------------------------------------------------ commands


def _cmd_generate(args) -> int:
    from sagevideo import generate as gen
    from sagevideo.video_io import write_frames, write_video

    out = _check_output_file(args.output)
    frames_dir = _check_output_dir(args.frames_dir, "--frames-dir") if args.frames_dir else None
    pipe, source, config, s, fps = _prepare(args)
    _info(f"generating {s['frames']} frames at {s['height']}x{s['width']}, {s['steps']} steps, seed {s['seed']}, "
          f"attention: {_describe_config(config)}, model: {source.name}")
    result = gen.generate(
        pipe, args.prompt, config=config, steps=s["steps"], frames=s["frames"], height=s["height"], width=s["width"],
        seed=s["seed"], guidance=s["guidance"], negative_prompt=s["negative_prompt"], progress=not args.no_progress,
    )
    write_video(out, result.frames, fps=fps)
    print(f"generated {result.frames.shape[0]} frames of {result.frames.shape[1]}x{result.frames.shape[2]} "
          f"in {result.seconds:.2f} s")
    print(f"wrote {out.resolve()}")
    if frames_dir is not None:
        paths = write_frames(frames_dir, result.frames)
        print(f"wrote {len(paths)} PNG frames to {frames_dir.resolve()}")
    if source.notice:
        print("note: random-weight model (the bundled tiny-wan folder holds no model): the video is noise", file=sys.stderr)
    return EXIT_OK


def _cmd_compare(args) -> int:
    from sagevideo.comparison import compare

    out_dir = _check_output_dir(args.output, "--output")
    pipe, source, config, s, fps = _prepare(args)
    _info(f"comparing dense vs {_describe_config(config)}: {s['frames']} frames at {s['height']}x{s['width']}, "
          f"{s['steps']} steps, seed {s['seed']}, model: {source.name}")
    extra = {"model_source": source.kind}
    if source.notice:
        extra["notice"] = source.notice
    res = compare(
        pipe, args.prompt, config=config, out_dir=out_dir, warmup_steps=args.warmup_steps, fps=fps,
        model_name=source.name, extra_info=extra, progress=not args.no_progress,
        steps=s["steps"], frames=s["frames"], height=s["height"], width=s["width"], seed=s["seed"],
        guidance=s["guidance"], negative_prompt=s["negative_prompt"],
    )
    m, info = res["metrics"], res["info"]

    def mean(name, fmt):
        e = m.get(name, {})
        return format(e["mean"], fmt) if e.get("available") else "n/a"

    print(f"dense {info['wall_seconds']['dense']:.2f} s, accelerated {info['wall_seconds']['accelerated']:.2f} s, "
          f"speed-up {info['speedup']:.2f}x" + ("" if info["speedup_meaningful"] else f" ({info['speedup_note']})"))
    print(f"PSNR {mean('psnr', '.2f')} dB, SSIM {mean('ssim', '.4f')}, LPIPS {mean('lpips', '.4f')}")
    for name, r in (info.get("sparse") or {}).items():
        if r.get("mean_density") is not None:
            heads = ", ".join(f"{k} {v}" for k, v in sorted(r.get("heads", {}).items()))
            print(f"sparse attention in {name}: {r['calls']} calls, mean density {r['mean_density']:.3f}"
                  + (f" (head classes: {heads})" if heads else ""))
    doc = res.get("report") or {}
    video = (doc.get("side_by_side") or {}).get("file")
    print(f"wrote {(out_dir / 'report.html').resolve()} (and metrics.json"
          + (f", {video})" if video else f"; no side-by-side video: {doc['side_by_side'].get('unavailable')})"))
    return EXIT_OK


def _cmd_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        _err("`sagevideo bench` measures GPU attention kernels, and this machine has no CUDA GPU "
             f"(torch {torch.__version__}, CUDA {'not built in' if torch.version.cuda is None else 'unavailable'}); "
             "run it on a machine with an NVIDIA GPU (sm80 or newer) and a CUDA build of torch")
        return EXIT_INPUT
    from sagevideo import bench

    if args.shapes:
        unknown = [n for n in args.shapes if n not in bench.SHAPES]
        if unknown:
            _err(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(bench.SHAPES)}")
            return EXIT_INPUT
    t0 = time.perf_counter()
    rows = bench.run(args.shapes, modes=tuple(args.modes), rep_ms=args.rep_ms, out_json=args.json,
                     log=lambda msg: print(msg, file=sys.stderr))
    print(bench.format_table(rows))
    _info(f"benchmark took {time.perf_counter() - t0:.1f} s" + (f"; rows written to {args.json}" if args.json else ""))
    return EXIT_OK


def _cmd_env(args) -> int:
    from sagevideo import methods, profiles
    from sagevideo.generate import environment

    env = environment()
    env["attention_methods"] = list(methods.names())
    env["profiles"] = profiles.names()
    try:
        from sagevideo.recipes import tiny_wan

        p = Path(tiny_wan.asset_path())
        env["bundled_model"] = str(p) if (p / "model_index.json").is_file() else f"{p} (holds no model)"
    except Exception as exc:  # pragma: no cover
        env["bundled_model"] = f"unavailable ({exc})"
    if args.json:
        print(json.dumps(env, indent=2))
        return EXIT_OK
    print(f"sagevideo {env['versions'].get('sagevideo')}  python {env['versions']['python']}  {env['platform']}")
    for k, v in env["versions"].items():
        if k not in ("sagevideo", "python"):
            print(f"  {k:15s} {v}")
    print(f"CUDA available: {env['cuda_available']} (torch built with CUDA {env['torch_cuda']})")
    gpu = env["gpu"]
    print("GPU: " + (f"{gpu['name']} ({gpu['capability']}, {gpu['memory_gib']} GiB) x{gpu['count']}" if gpu else "none"))
    print(f"CPU threads: {env['cpu_threads']}")
    print(f"attention methods: {', '.join(env['attention_methods'])}")
    print(f"profiles: {', '.join(env['profiles']) or 'none'}")
    print(f"bundled model: {env['bundled_model']}")
    return EXIT_OK


_COMMANDS = {"generate": _cmd_generate, "compare": _cmd_compare, "bench": _cmd_bench, "env": _cmd_env}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sagevideo`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_INPUT
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    from sagevideo.generate import InputError
    from sagevideo.video_io import UnsupportedFormatError, VideoWriteError

    try:
        return _COMMANDS[args.command](args)
    except InputError as exc:
        _err(str(exc))
        return EXIT_INPUT
    except (VideoWriteError, UnsupportedFormatError) as exc:
        _err(f"{exc}; choose a writable location and a .mp4/.gif file name")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
